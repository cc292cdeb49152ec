"""Stage 2: instruction tuning on the task mixture (encoder, projector, LoRA).

    python jobs/finetune.py --config experiments/quickstart.yaml [--init CHECKPOINT]
    ray job submit --working-dir . -- python jobs/finetune.py --config experiments/quickstart.yaml
"""

import json

from _args import parser

p = parser(__doc__)
p.add_argument("--init", help="checkpoint to start from (stage 2: the stage-1 model)")
p.add_argument("--name", help="run name (rerun with the same name to resume)")
args = p.parse_args()

from m4cxr.config import load_experiment  # noqa: E402
from m4cxr.train.run import run_stage  # noqa: E402

exp = load_experiment(args.config, args.set)
summary = run_stage(exp, "instruction", exp.data.corpus_dir, init_checkpoint=args.init, run_name=args.name)
print(json.dumps(summary, indent=2))
