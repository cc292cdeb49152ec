"""Stage 2: instruction tuning on the task mixture (encoder, projector, LoRA).

    python jobs/finetune.py --config experiments/quickstart.yaml [--init CHECKPOINT] [--name RUN]
    ray job submit --working-dir . -- python jobs/finetune.py --config experiments/quickstart.yaml
"""

from _args import train_stage

train_stage("instruction", __doc__)
