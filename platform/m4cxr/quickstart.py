"""The main job: the whole platform on the synthetic world, on a laptop CPU.

synthetic world -> tokenizer -> stage 1 (projector) -> stage 2 (instruction tuning) -> evaluation
on the test split -> a 4-trial sweep from the stage-2 model -> the services on Ray Serve, one
request of each kind -> summary.json.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from ray import serve

from m4cxr.config import load_experiment
from m4cxr.data.prior_references import count_rewrites, describe as describe_rewrites
from m4cxr.data.schema import ImageStore, read_sample_table
from m4cxr.data.synthetic import synthesize
from m4cxr.eval.run import eval_summary, evaluate
from m4cxr.serve.apps import run_services
from m4cxr.sweep.run import run_sweep
from m4cxr.tasks import headline_task
from m4cxr.train.run import prepare_tokenizer, run_stage

log = logging.getLogger(__name__)


def run_quickstart(out: str | Path, config: str | Path = "experiments/quickstart.yaml", overrides=(),
                   sweep_config: str | Path = "experiments/sweeps/quickstart.yaml") -> dict:
    out = Path(out).resolve()
    places = [f"data.corpus_dir={out / 'corpus'}", f"train.output_dir={out / 'train'}", f"tune.output_dir={out / 'sweeps'}"]
    exp = load_experiment(config, [*places, *overrides])
    started = time.time()
    summary: dict = {"experiment": str(config), "out": str(out)}

    log.info(f"quickstart 1/7: synthetic world ({exp.data.synthetic.patients} patients) -> {exp.data.corpus_dir}")
    manifest = synthesize(exp.data.corpus_dir, exp.data.synthetic, exp.data.box_convention, exp.data.system_prompt)
    summary["data"] = {"corpus": exp.data.corpus_dir, "samples": manifest["samples"], "images": manifest["images"],
                       "patients": manifest["patients"], "leakage": manifest["leakage"]["patients_in_several_splits"],
                       "prior_references": {"setting": exp.data.prior_references,
                                            **count_rewrites(exp.data.corpus_dir, "train")}}
    log.info(f"quickstart: training targets (data.prior_references: {exp.data.prior_references}): "
             + describe_rewrites(summary["data"]["prior_references"]))

    log.info("quickstart 2/7: tokenizer")
    prepare_tokenizer(exp, exp.data.corpus_dir)

    log.info(f"quickstart 3/7: stage 1, projector pre-training ({exp.train.pretrain.training_steps} steps)")
    stage1 = run_stage(exp, "pretrain", exp.data.corpus_dir)
    log.info(f"quickstart 4/7: stage 2, instruction tuning ({exp.train.instruction.training_steps} steps)")
    stage2 = run_stage(exp, "instruction", exp.data.corpus_dir, init_checkpoint=stage1["checkpoint"])
    summary["train"] = {
        "val_loss_first": stage2["val_loss_first"], "val_loss_last": stage2["val_loss_last"],
        "steps": stage2["steps"], "nonpad_token_share": stage2["nonpad_token_share"],
        "checkpoint": stage2["checkpoint"], "skipped_samples": stage2["skipped_samples"],
        "seconds": round(stage1["seconds"] + stage2["seconds"], 1), "pretrain": stage1,
    }
    log.info("quickstart 5/7: evaluation on the test split (Ray Data batch inference)")
    results = evaluate(exp, stage2["checkpoint"], out / "eval")
    summary["eval"] = {**eval_summary(results, exp), "report": results["files"]["report"],
                       "seconds": results["seconds"]}
    sweep_exp = load_experiment(sweep_config, [*places, f"tune.init_checkpoint={stage2['checkpoint']}", *overrides])
    log.info(f"quickstart 6/7: sweep, {sweep_exp.tune.num_trials} trials (Ray Tune + Optuna)")
    sweep = run_sweep(sweep_exp, name="quickstart-sweep")
    summary["sweep"] = {k: sweep.get(k) for k in ("trials", "completed", "pareto_size", "best_experiment", "plot",
                                                   "best_params", "best_objectives", "seconds")}
    log.info(f"quickstart 7/7: serving on {exp.serve.host}:{exp.serve.port} (Ray Serve), one request of each kind")
    served = {"default": stage2["checkpoint"]}
    if sweep.get("best_checkpoint"):
        served["sweep-best"] = sweep["best_checkpoint"]
    summary["serve"] = serve_check(served, exp, exp.data.corpus_dir)
    summary["seconds"] = round(time.time() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    t = summary["train"]
    print(f"\nquickstart done in {summary['seconds']:.0f}s -> {out / 'summary.json'}\n"
          f"  data: {summary['data']['samples']} samples, {summary['data']['images']} images, leakage {summary['data']['leakage']}\n"
          f"  stage 1: val loss {stage1['val_loss_first']:.3f} -> {stage1['val_loss_last']:.3f} in {stage1['steps']} steps\n"
          f"  stage 2: val loss {t['val_loss_first']:.3f} -> {t['val_loss_last']:.3f} in {t['steps']} steps, "
          f"non-padding tokens {t['nonpad_token_share']:.0%}\n"
          f"  model: {t['checkpoint']}\n"
          f"  eval: {describe_eval(summary['eval'])}\n"
          f"  sweep: {sweep['completed']}/{sweep['trials']} trials, Pareto front of {sweep['pareto_size']}, "
          f"best -> {sweep.get('best_experiment')}\n"
          f"  serve: {summary['serve']['requests_ok']} requests answered, {summary['serve']['requests_failed']} failed")
    return summary


def describe_eval(ev: dict) -> str:
    parts = []
    if "mrg" in ev:
        parts.append(f"report mF1-14 {ev['mrg']['mF1-14']:.3f} (baseline {ev['mrg']['baseline_mF1-14']:.3f})")
    if "grounding" in ev:
        parts.append(f"grounding mIoU {ev['grounding']['mIoU']:.3f} (baseline {ev['grounding']['baseline_mIoU']:.3f})")
    if "vqa" in ev:
        parts.append(f"VQA accuracy {ev['vqa']['accuracy']:.3f} (baseline {ev['vqa']['baseline_accuracy']:.3f})")
    return "; ".join(parts) + f"; report page {ev['report']}"


def serve_check(checkpoints: dict[str, str], exp, corpus_dir: str) -> dict:
    """Start the services, load the web page and send one request of each kind (report,
    grounding, VQA, chat with the sweep's winner), print the answers, shut down."""
    port = exp.serve.port
    with socket.socket() as probe:  # a busy port (another server) is not worth failing the quickstart for
        if probe.connect_ex((exp.serve.host, port)) == 0:
            port = 0  # Serve would not pick one: bind a free one below
    if port == 0:
        with socket.socket() as free:
            free.bind((exp.serve.host, 0))
            port = free.getsockname()[1]
        log.info(f"  port {exp.serve.port} is taken; serving on {port}")
    url = run_services(checkpoints, port=port, host=exp.serve.host, max_new_tokens=exp.eval.max_new_tokens,
                       engine=exp.serve.engine, allow_unauthenticated=exp.serve.allow_unauthenticated)
    scenario = headline_task("report")  # a single-image report
    sample = next(r for r in read_sample_table(corpus_dir, "test").to_pylist() if r["task"] == scenario)
    image = base64.b64encode(ImageStore(corpus_dir).path(sample["images"][0]["image_id"]).read_bytes()).decode()
    chat_model = "sweep-best" if "sweep-best" in checkpoints else "default"
    requests = {
        "mrg": ("/mrg", {"scenario": scenario, "images": [image], "grounded": True}),
        "grounding": ("/grounding", {"image": image, "phrase": "There is a small left pleural effusion."}),
        "vqa": ("/vqa", {"images": [image], "question": "Is the heart enlarged?"}),
        "chat": ("/v1/chat/completions", {"model": chat_model, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "radiology image:"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            {"type": "text", "text": "Answer the question. Is there a pneumothorax?"}]}]}),
    }
    out = {"url": url, "checkpoints": list(checkpoints), "requests_ok": 0, "requests_failed": 0, "answers": {}}
    try:
        try:  # the web page, at /ui beside the routes
            with urllib.request.urlopen(url + "/ui/", timeout=120) as r:
                page_ok = r.status == 200 and b"M4CXR" in r.read()  # the page and its config
        except (urllib.error.URLError, TimeoutError):
            page_ok = False
        out["requests_ok" if page_ok else "requests_failed"] += 1
        log.info(f"  /ui/: {'the page' if page_ok else 'no page'} (open {url}/ui/ in a browser)")
        for name, (route, body) in requests.items():
            req = urllib.request.Request(url + route, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    answer = json.loads(r.read())
                out["requests_ok"] += 1
            except (urllib.error.URLError, TimeoutError) as err:
                answer = {"error": str(err)}
                out["requests_failed"] += 1
            if name == "chat":
                answer = {"model": answer.get("model"), "answer": (answer.get("choices") or [{}])[0].get("message", {})
                          .get("content"), **({"error": answer["error"]} if "error" in answer else {})}
            out["answers"][name] = answer
            log.info(f"  {route}: {json.dumps(answer)[:300]}")
    finally:
        serve.shutdown()
    return out
