"""The `m4cxr` command.

    m4cxr config show FILE [--set a.b=c ...]
    m4cxr mixture show FILE [--strategy d1] [--corpus DIR] [--json]
    m4cxr data synth --out DIR [--patients N] [--seed S] [--config FILE]
    m4cxr data stats DIR [--json]
    m4cxr data remove-priors IN.csv --column TEXT --out OUT.csv
    m4cxr data prepare --config FILE --source NAME=PATH [--source ...] --out DIR [--allow-leakage]
    m4cxr data leakage DIR
    m4cxr data real-organs --coco FILE --images DIR --out DIR
    m4cxr model summary FILE [--json]
    m4cxr model import --base DIR [--adapter DIR] --out DIR [--vision-config SRC] [--llm-config SRC]
    m4cxr train --stage pretrain|instruction --config FILE [--init CKPT] [--name RUN]
    m4cxr eval --config FILE --checkpoint CKPT [--out DIR] [--corpus DIR]
    m4cxr sweep --config FILE [--name NAME]
    m4cxr serve --checkpoint DIR [--checkpoint NAME=DIR ...] [--port P] [--host H]
    m4cxr quickstart --out DIR
    m4cxr score nlg --hyps H.txt --refs R.txt [--refs R2.txt] [--json]
    m4cxr label REPORTS.csv --column TEXT --out LABELS.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

from m4cxr import log_progress
from m4cxr.config import (
    ConfigError, Experiment, apply_override, dump_experiment, experiment_from_dict, load_experiment,
)

# Each command imports the layers it uses when it runs, so that `m4cxr --help` and the light
# commands start without loading torch, transformers or Ray.


def _experiment(args) -> Experiment:
    """The --config file (or the defaults) with the --set overrides applied."""
    if getattr(args, "config", None):
        return load_experiment(args.config, args.set or [])
    raw: dict = {}
    for item in getattr(args, "set", None) or []:
        raw = apply_override(raw, item, "the defaults")
    return experiment_from_dict(raw, "the defaults")


def cmd_config_show(args) -> int:
    exp = load_experiment(args.file, args.set or [])
    print(f"# resolved from {exp.source}" + (f" with {' '.join(args.set)}" if args.set else ""))
    print(dump_experiment(exp), end="")
    return 0


def cmd_mixture_show(args) -> int:
    from m4cxr.data.mixture import build_mixture
    from m4cxr.data.stats import pair_counts

    exp = load_experiment(args.file, args.set or [])
    available = pair_counts(args.corpus, "train") if args.corpus else None
    mixture = build_mixture(exp.data.mixture, available, strategy=args.strategy, source=str(args.file))
    info = mixture.to_json()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"mixture of {args.file}: strategy {info['strategy']}, {info['pairs']} pairs, seed {info['seed']}")
    for key, prob in sorted(info["probabilities"].items(), key=lambda kv: -kv[1]):
        print(f"  {prob:8.4f}  {key}")
    shares = info["task_type_shares"]
    print("task-type shares: " + ", ".join(f"{k} {v:.2f}" for k, v in shares.items()))
    return 0


def cmd_data_synth(args) -> int:
    from m4cxr.data.synthetic import synthesize

    exp = _experiment(args)
    cfg = exp.data.synthetic
    if args.patients is not None:
        cfg.patients = args.patients
    if args.seed is not None:
        cfg.seed = args.seed
    if args.image_size is not None:
        cfg.image_size = args.image_size
    manifest = synthesize(args.out, cfg, exp.data.box_convention, exp.data.system_prompt)
    print(f"synth: {manifest['samples']} samples, {manifest['images']} images, "
          f"patients {manifest['patients']}, leakage {manifest['leakage']['patients_in_several_splits']}")
    return 0


def cmd_data_stats(args) -> int:
    from m4cxr.data.prior_references import count_rewrites, describe
    from m4cxr.data.stats import corpus_stats, report_leakage

    stats = corpus_stats(args.dir)
    stats["prior_references"] = count_rewrites(args.dir, "train")
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"{args.dir}: {stats['samples']} samples, {stats['images']} images")
    splits = ("train", "validate", "test")
    print(f"  {'task':32s}" + "".join(f"{s:>10s}" for s in splits))
    for task, by_split in stats["tasks"].items():
        print(f"  {task:32s}" + "".join(f"{by_split.get(s, 0):>10d}" for s in splits))
    if stats["report_scenarios"]:
        print("  report generation by rule:")
        for rule, by_split in stats["report_scenarios"].items():
            print(f"    {rule:30s}" + "".join(f"{by_split.get(s, 0):>10d}" for s in splits))
    print("  patients: " + ", ".join(f"{k} {v}" for k, v in stats["patients"].items()))
    print("  training targets: " + describe(stats["prior_references"]))
    return report_leakage(stats["leakage"])


def cmd_data_remove_priors(args) -> int:
    from m4cxr.data.prior_references import rewrite_csv

    t = rewrite_csv(args.csv, args.column, args.out)
    print(f"{args.out}: {t['rows']} rows ({t['empty']} with an empty {args.column!r}); {t['changed']} reports "
          f"rewritten: {t['sentences_changed']} sentences changed, {t['sentences_removed']} of them removed; "
          f"{t['sentences_kept_for_labels']} sentences kept as written because their CheXpert labels would change")
    return 0


def cmd_data_leakage(args) -> int:
    from m4cxr.data.stats import corpus_stats, report_leakage

    print(f"{args.dir}:")
    return report_leakage(corpus_stats(args.dir)["leakage"])


def cmd_data_prepare(args) -> int:
    from m4cxr.data.prepare import parse_sources, prepare
    from m4cxr.data.prior_references import describe
    from m4cxr.data.stats import report_leakage

    exp = _experiment(args)
    manifest = prepare(exp, parse_sources(args.source), args.out, seed=args.seed)
    print(f"{args.out}: {manifest['samples']} samples, {manifest['images']} images, "
          f"{len(manifest['counts'])} tasks, {len(manifest['pairs'])} task-dataset pairs")
    for task, by_dataset in manifest["counts"].items():
        for dataset, by_split in by_dataset.items():
            print(f"  {task + '/' + dataset:48s}" + "  ".join(f"{s} {n}" for s, n in sorted(by_split.items())))
    skipped = Counter(item["dataset"] for item in manifest["skipped"])
    print(f"  skipped records: {len(manifest['skipped'])}" +
          (f" ({', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))}; reasons in manifest.json)" if skipped else ""))
    for dataset, rules in manifest["excluded"].items():
        print(f"  left out by rules, {dataset}: " + "; ".join(f"{rule}: {n}" for rule, n in rules.items()))
    for dataset, notes in manifest["notes"].items():
        for note in notes:
            print(f"  note, {dataset}: {note}")
    print(f"  training targets (data.prior_references: {manifest['prior_references']['setting']}): "
          + describe(manifest["prior_references"]))
    failed = report_leakage(manifest["leakage"])
    if failed and args.allow_leakage:
        print("  (--allow-leakage: the corpus is kept as written)")
        return 0
    return failed


def cmd_data_real_organs(args) -> int:
    from m4cxr.data.sources.coco_lung_boxes import write_organ_corpus

    exp = _experiment(args)
    manifest = write_organ_corpus(args.coco, args.images, args.out, exp.data.image_size,
                                  exp.data.box_convention, exp.data.system_prompt)
    print(f"real organs: {manifest['samples']} samples from {manifest['images']} images -> {args.out}; "
          f"skipped {len(manifest['skipped'])}")
    for item in manifest["skipped"]:
        print(f"  skipped {item['record']}: {item['reason']}")
    return 0


def cmd_model_summary(args) -> int:
    from m4cxr.model.summary import model_summary

    info = model_summary(load_experiment(args.file, args.set or []))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model of {args.file}: vision {info['vision_encoder']}, LLM {info['llm']}")
    for part, n in info["params"].items():
        print(f"  {part:10s} {n:>15,d} parameters")
    print(f"  {'lora':10s} {info['lora_params']:>15,d} parameters")
    for stage, n in info["trainable"].items():
        print(f"  trainable in {stage}: {n:,}")
    print(f"  tokens per image: {info['encoder_tokens_per_image']} from the encoder, "
          f"{info['visual_tokens_per_image']} after the projector")
    return 0


def cmd_model_import(args) -> int:
    from m4cxr.model.release import import_release

    info = import_release(args.base, args.out, adapter=args.adapter, vision=args.vision_config, llm=args.llm_config,
                          processor=args.processor, tokenizer=args.tokenizer)
    print(f"imported {args.base}" + (f" + {args.adapter}" if args.adapter else "") + f" -> {info['checkpoint']}")
    print("  tensors: " + ", ".join(f"{part} {n}" for part, n in info["tensors"].items()) + " (every one mapped and checked)")
    lora = info["lora"]
    print("  LoRA: " + (f"r {lora['r']}, alpha {lora['alpha']} on {', '.join(lora['target_modules'])}" if lora
                        else "none (merged into the LLM)"))
    i = info["image"]
    print(f"  images: {i['image_size']} px, {i['box_convention']}, mean {i['image_mean'][0]}, std {i['image_std'][0]}; "
          f"{info['projector']['num_query_tokens']} visual tokens per image; tokenizer from {info['tokenizer']}")
    return 0


def cmd_train(args) -> int:
    from m4cxr.train.run import StoppedEarly, run_stage

    exp = load_experiment(args.config, args.set or [])
    try:
        summary = run_stage(exp, args.stage, args.corpus or exp.data.corpus_dir, init_checkpoint=args.init,
                            run_name=args.name)
    except StoppedEarly as stopped:  # at a checkpoint, on SIGUSR1: the same command goes on from it
        print(stopped, file=sys.stderr)
        return stopped.exit_code
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args) -> int:
    from m4cxr.eval.run import evaluate

    exp = load_experiment(args.config, args.set or [])
    out = args.out or f"runs/{exp.name}/eval"
    evaluate(exp, args.checkpoint, out, corpus_dir=args.corpus)
    return 0


def cmd_sweep(args) -> int:
    from m4cxr.sweep.run import run_sweep

    exp = load_experiment(args.config, args.set or [])
    summary = run_sweep(exp, args.name)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_serve(args) -> int:
    from ray import serve

    from m4cxr.serve.apps import run_services

    checkpoints = {}
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if sep and name and path:
            checkpoints[name] = path
        else:
            checkpoints["default" if "default" not in checkpoints else f"checkpoint{len(checkpoints)}"] = item
    keys = {"api_keys_file": args.api_keys_file} if args.api_keys_file else {}
    url = run_services(checkpoints, port=args.port, host=args.host, max_new_tokens=args.max_new_tokens,
                       max_batch_size=args.max_batch_size, use_gpu=args.gpu, engine=args.engine,
                       allow_unauthenticated=args.allow_unauthenticated, **keys)
    print(f"serving {', '.join(f'{k}={v}' for k, v in checkpoints.items())} at {url}:\n"
          f"  POST {url}/mrg  {url}/grounding  {url}/vqa  {url}/v1/chat/completions;  GET {url}/v1/models\n"
          f"  the web page: {url}/ui/\n"
          f"  (Ctrl-C stops)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("stopping the services")
    serve.shutdown()
    return 0


def cmd_quickstart(args) -> int:
    from m4cxr.quickstart import run_quickstart

    run_quickstart(args.out, args.config, args.set or [])
    return 0


def cmd_label(args) -> int:
    from m4cxr.labeler import label_report
    from m4cxr.tasks import chexbert_labels

    with open(args.reports, newline="") as f:
        reader = csv.DictReader(f)
        if args.column not in (reader.fieldnames or []):
            raise ValueError(f"{args.reports}: no column {args.column!r}; the columns are {reader.fieldnames}")
        texts = [row[args.column] or "" for row in reader]
    names = chexbert_labels()
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([args.column, *names])
        for text in texts:
            labels = label_report(text)
            writer.writerow([text, *("" if labels.get(n) is None else f"{float(labels[n]):.1f}" for n in names)])
    print(f"labelled {len(texts)} reports -> {args.out}")
    return 0


def cmd_score_nlg(args) -> int:
    from m4cxr.eval.metrics import nlg_scores

    hyps = Path(args.hyps).read_text().splitlines()
    ref_files = [Path(r).read_text().splitlines() for r in args.refs]
    for path, refs in zip(args.refs, ref_files):
        if len(refs) != len(hyps):
            raise ValueError(f"{path}: {len(refs)} lines but {args.hyps} has {len(hyps)}; one report per line in both")
    scores = nlg_scores(hyps, [list(r) for r in zip(*ref_files)], tokenize=not args.no_tokenize)
    if args.json:
        print(json.dumps(scores, indent=2))
    else:
        print("  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m4cxr", description="M4CXR on Ray: data, training, evaluation, sweeps, serving")
    sub = parser.add_subparsers(dest="command", required=True)
    add_config_commands(sub)
    add_mixture_commands(sub)
    add_train_commands(sub)
    add_serve_commands(sub)
    add_label_commands(sub)
    add_model_commands(sub)
    add_data_commands(sub)
    return parser


def with_set(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    return p


def add_config_commands(sub) -> None:
    config = sub.add_parser("config", help="experiment files").add_subparsers(dest="action", required=True)
    p = with_set(config.add_parser("show", help="print the resolved config"))
    p.add_argument("file")
    p.set_defaults(func=cmd_config_show)


def add_mixture_commands(sub) -> None:
    mixture = sub.add_parser("mixture", help="task mixtures").add_subparsers(dest="action", required=True)
    p = with_set(mixture.add_parser("show", help="pairs, probabilities and task-type shares"))
    p.add_argument("file")
    p.add_argument("--strategy", choices=["empirical", "d1", "d2", "d3", "d4"])
    p.add_argument("--corpus", help="a corpus folder: drop pairs without data, take sizes from it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mixture_show)


def add_train_commands(sub) -> None:
    """train, eval and sweep."""
    p = with_set(sub.add_parser("train", help="train one stage on Ray"))
    p.add_argument("--stage", choices=["pretrain", "instruction"], required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--corpus", help="corpus folder (default: data.corpus_dir)")
    p.add_argument("--init", help="checkpoint to start from (stage 2: the stage-1 model)")
    p.add_argument("--name", help="run name (rerun with the same name to resume)")
    p.set_defaults(func=cmd_train)

    p = with_set(sub.add_parser("eval", help="evaluate a checkpoint on a test split (Ray Data batch inference)"))
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", required=True, help="a run's final/ folder (or any checkpoint folder)")
    p.add_argument("--out", help="output folder (default: runs/<experiment name>/eval)")
    p.add_argument("--corpus", help="corpus folder (default: data.corpus_dir)")
    p.set_defaults(func=cmd_eval)

    p = with_set(sub.add_parser("sweep", help="sweep mixture and LoRA settings (Ray Tune + Optuna)"))
    p.add_argument("--config", required=True, help="an experiment file with a tune section (experiments/sweeps/)")
    p.add_argument("--name", help="sweep name (default: <experiment>-sweep); rerun with it to continue")
    p.set_defaults(func=cmd_sweep)


def add_serve_commands(sub) -> None:
    """serve and quickstart."""
    p = sub.add_parser("serve", help="serve checkpoints with Ray Serve (mrg, grounding, vqa, OpenAI-style chat, the web page)")
    p.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]DIR",
                   help="a checkpoint folder; repeat as NAME=DIR to serve several (the first is the default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on; beyond loopback (0.0.0.0, a node's address) API keys are "
                        "required unless --allow-unauthenticated")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve beyond this machine without API keys, on purpose")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--gpu", action="store_true", help="one GPU per replica, bf16")
    p.add_argument("--engine", choices=["auto", "vllm", "hf"], default="auto",
                   help="the LLM's engine: vLLM where it is installed (auto), or transformers")
    p.add_argument("--api-keys-file", help="require one of these API keys (one per line, or sha256:<hex>); "
                                           "keys also come from M4CXR_API_KEYS")
    p.set_defaults(func=cmd_serve)

    p = with_set(sub.add_parser("quickstart", help="the main job on the synthetic world"))
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--config", default="experiments/quickstart.yaml")
    p.set_defaults(func=cmd_quickstart)


def add_label_commands(sub) -> None:
    """label and score."""
    p = sub.add_parser("label", help="CheXpert-14 labels of report texts (rule-based labeler)")
    p.add_argument("reports", help="a CSV file of reports")
    p.add_argument("--column", default="Reports", help="the column holding the report text")
    p.add_argument("--out", required=True, help="output CSV: the text and one column per observation (1, 0, -1, blank)")
    p.set_defaults(func=cmd_label)

    score = sub.add_parser("score", help="metrics").add_subparsers(dest="action", required=True)
    p = score.add_parser("nlg", help="BLEU-1..4 and ROUGE-L (pycocoevalcap), one report per line")
    p.add_argument("--hyps", required=True)
    p.add_argument("--refs", required=True, action="append", help="reference file (repeat for several references)")
    p.add_argument("--no-tokenize", action="store_true", help="keep the text as it is (no lower-casing or punctuation split)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_score_nlg)


def add_model_commands(sub) -> None:
    model = sub.add_parser("model", help="the model").add_subparsers(dest="action", required=True)
    p = with_set(model.add_parser("summary", help="parameter counts, built on the meta device"))
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_model_summary)
    p = model.add_parser("import", help="the authors' published M4CXR (stage-1 folder, stage-2 adapter) as a checkpoint")
    p.add_argument("--base", required=True, help="their stage-1 model folder, or one folder with the merged model")
    p.add_argument("--adapter", help="their stage-2 PEFT adapter folder")
    p.add_argument("--out", required=True, help="the checkpoint folder to write")
    p.add_argument("--vision-config", help="Rad-DINO's folder or hub id (default: the one the release names)")
    p.add_argument("--llm-config", help="Mistral's folder or hub id (default: the one the release names)")
    p.add_argument("--processor", help="the image processor's folder (default: the release's, else Rad-DINO's)")
    p.add_argument("--tokenizer", help="the tokenizer's folder (default: the release's)")
    p.set_defaults(func=cmd_model_import)


def add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="corpora").add_subparsers(dest="action", required=True)
    p = with_set(data.add_parser("synth", help="write the synthetic CXR world"))
    p.add_argument("--out", required=True)
    p.add_argument("--patients", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--config", help="experiment file (data.synthetic, data.box_convention)")
    p.set_defaults(func=cmd_data_synth)
    p = data.add_parser("stats", help="counts per task, dataset and split; leakage check")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data_stats)
    p = with_set(data.add_parser("prepare", help="a corpus from the public datasets in their official layouts"))
    p.add_argument("--config", help="experiment file (data.image_size, data.box_convention, data.system_prompt)")
    p.add_argument("--source", action="append", required=True, metavar="NAME=PATH",
                   help="a dataset folder (repeatable); NAME as in Table 10 (mimic_cxr, ms_cxr, imagenome, ...) or slake")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="seed of the per-image choices (which region, which box)")
    p.add_argument("--allow-leakage", action="store_true", help="exit 0 even when a leakage check fails")
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("remove-priors", help="rewrite a CSV of reports without references to prior studies, "
                                              "keeping their findings and CheXpert labels")
    p.add_argument("csv", help="the reports, one per row, with a header row (UTF-8)")
    p.add_argument("--column", required=True, help="the column that holds the report text")
    p.add_argument("--out", required=True, help="the CSV written: the same rows and columns, that one rewritten, "
                                                "and three columns of counts")
    p.set_defaults(func=cmd_data_remove_priors)
    p = data.add_parser("leakage", help="leakage checks of a corpus: patients in several splits, MS-CXR test images in training")
    p.add_argument("dir")
    p.set_defaults(func=cmd_data_leakage)
    p = with_set(data.add_parser("real-organs", help="organ-grounding samples from COCO lung boxes"))
    p.add_argument("--coco", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config")
    p.set_defaults(func=cmd_data_real_organs)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_progress()
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"m4cxr: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
