"""Sweep mixture and LoRA settings with Ray Tune + Optuna (the experiment file's tune section).

    python jobs/sweep.py --config experiments/sweeps/quickstart.yaml [--name NAME]
    ray job submit --working-dir . -- python jobs/sweep.py --config experiments/sweeps/lora.yaml
Rerun with the same name to continue an interrupted sweep.
"""

import json

from _args import parser

p = parser(__doc__)
p.add_argument("--name", help="sweep name (default: <experiment>-sweep)")
args = p.parse_args()

from m4cxr.config import load_experiment  # noqa: E402
from m4cxr.sweep.run import run_sweep  # noqa: E402

summary = run_sweep(load_experiment(args.config, args.set), args.name)
print(json.dumps(summary, indent=2))
