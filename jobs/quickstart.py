"""The main job: synthetic world -> tokenizer -> stage 1 -> stage 2 -> DIR/summary.json.

    python jobs/quickstart.py --out runs/quickstart
"""

from _args import parser

p = parser(__doc__)
p.add_argument("--out", default="runs/quickstart")
args = p.parse_args()

from m4cxr.quickstart import run_quickstart  # noqa: E402

run_quickstart(args.out, args.config, args.set)
