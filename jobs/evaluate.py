"""Evaluate a checkpoint on the test split: Ray Data batch inference, the paper's metrics and
tables, grounding overlays and a report page.

    python jobs/evaluate.py --config experiments/quickstart.yaml --checkpoint CKPT [--out DIR]
    ray job submit --working-dir . -- python jobs/evaluate.py --config experiments/m4cxr.yaml --checkpoint CKPT
"""

import json

from _args import parser

p = parser(__doc__)
p.add_argument("--checkpoint", required=True, help="a run's final/ folder")
p.add_argument("--out", help="output folder (default: runs/<experiment name>/eval)")
args = p.parse_args()

from m4cxr.config import load_experiment  # noqa: E402
from m4cxr.eval.run import eval_summary, evaluate  # noqa: E402

exp = load_experiment(args.config, args.set)
results = evaluate(exp, args.checkpoint, args.out or f"runs/{exp.name}/eval")
print(json.dumps(eval_summary(results, exp), indent=2))
