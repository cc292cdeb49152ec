"""Shared command-line arguments of the job scripts (--config and --set)."""

import argparse
import sys
from pathlib import Path

# Jobs run from the repository root, with plain python or under `ray job submit --working-dir .`
# (where the package may not be installed): make platform/ importable either way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def parser(description: str) -> argparse.ArgumentParser:
    from m4cxr import log_progress  # after the path above

    log_progress()  # the platform's progress lines on stderr
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="experiments/quickstart.yaml", help="experiment file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return p


def train_stage(stage: str, description: str) -> None:
    """The body of pretrain.py and finetune.py: parse, train one stage, print its summary."""
    import json

    p = parser(description)
    p.add_argument("--init", help="checkpoint to start from (stage 2: the stage-1 model)")
    p.add_argument("--name", help="run name (rerun with the same name to resume)")
    args = p.parse_args()

    from m4cxr.config import load_experiment
    from m4cxr.train.run import StoppedEarly, run_stage

    exp = load_experiment(args.config, args.set)
    try:
        summary = run_stage(exp, stage, exp.data.corpus_dir, init_checkpoint=args.init, run_name=args.name)
    except StoppedEarly as stopped:  # at a checkpoint, on SIGUSR1 (Slurm's time-limit warning)
        print(stopped, file=sys.stderr)
        sys.exit(stopped.exit_code)
    print(json.dumps(summary, indent=2))
