"""Shared command-line arguments of the job scripts (--config and --set)."""

import argparse
import sys
from pathlib import Path

# Jobs run from the repository root, with plain python or under `ray job submit --working-dir .`
# (where the package may not be installed): make platform/ importable either way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="experiments/quickstart.yaml", help="experiment file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    return p
