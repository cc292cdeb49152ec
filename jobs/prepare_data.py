"""Prepare a corpus for training: write the synthetic world when the corpus folder is empty,
then train the run's tokenizer when the experiment asks for one (model.tokenizer: train).

    python jobs/prepare_data.py --config experiments/quickstart.yaml
"""

from pathlib import Path

from _args import parser

args = parser(__doc__).parse_args()

from m4cxr.config import load_experiment  # noqa: E402
from m4cxr.data.synthetic import synthesize  # noqa: E402
from m4cxr.train.run import prepare_tokenizer  # noqa: E402

exp = load_experiment(args.config, args.set)
corpus = Path(exp.data.corpus_dir)
if not (corpus / "samples").exists():
    synthesize(corpus, exp.data.synthetic, exp.data.box_convention, exp.data.system_prompt)
print(f"corpus: {corpus}; tokenizer: {prepare_tokenizer(exp, corpus)}")
