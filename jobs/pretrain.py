"""Stage 1: pre-train the projector on image-report pairs.

    python jobs/pretrain.py --config experiments/quickstart.yaml [--init CHECKPOINT] [--name RUN]
    ray job submit --working-dir . -- python jobs/pretrain.py --config experiments/quickstart.yaml
"""

from _args import train_stage

train_stage("pretrain", __doc__)
