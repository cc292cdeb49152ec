"""Write the synthetic CXR world: images, samples for all 17 tasks, manifest.

    python jobs/synth_data.py --config experiments/quickstart.yaml --out runs/synthetic
"""

import argparse

from m4cxr.config import load_experiment
from m4cxr.data.synthetic import synthesize

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--config", default="experiments/quickstart.yaml")
parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
parser.add_argument("--out", help="corpus folder (default: data.corpus_dir)")
args = parser.parse_args()

exp = load_experiment(args.config, args.set)
out = args.out or exp.data.corpus_dir
manifest = synthesize(out, exp.data.synthetic, exp.data.box_convention, exp.data.system_prompt)
print(f"corpus: {out} ({manifest['samples']} samples, {manifest['images']} images, "
      f"{manifest['leakage']['patients_in_several_splits']} patients in several splits)")
