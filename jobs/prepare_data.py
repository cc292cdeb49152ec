"""Prepare a corpus for training: with --source NAME=PATH, prepare it from the public datasets
(see `m4cxr data prepare`); otherwise write the synthetic world when the corpus folder is empty.
Then train the run's tokenizer when the experiment asks for one (model.tokenizer: train).

    python jobs/prepare_data.py --config experiments/quickstart.yaml
    python jobs/prepare_data.py --config experiments/m4cxr.yaml --source mimic_cxr=/data/mimic-cxr-jpg ...
"""

import sys
from pathlib import Path

from _args import parser

p = parser(__doc__)
p.add_argument("--source", action="append", default=[], metavar="NAME=PATH", help="a public dataset's folder")
args = p.parse_args()

from m4cxr.config import load_experiment  # noqa: E402
from m4cxr.data.prepare import parse_sources, prepare  # noqa: E402
from m4cxr.data.stats import report_leakage  # noqa: E402
from m4cxr.data.synthetic import synthesize  # noqa: E402
from m4cxr.train.run import prepare_tokenizer  # noqa: E402

exp = load_experiment(args.config, args.set)
corpus = Path(exp.data.corpus_dir)
if args.source:
    manifest = prepare(exp, parse_sources(args.source), corpus)
    if report_leakage(manifest["leakage"]):
        sys.exit(1)
elif not (corpus / "samples").exists():
    synthesize(corpus, exp.data.synthetic, exp.data.box_convention, exp.data.system_prompt)
print(f"corpus: {corpus}; tokenizer: {prepare_tokenizer(exp, corpus)}")
