"""Batch inference on Ray Data: test samples -> the model's answers, as an Arrow table.

    requests (sample row, mode)            ray.data.from_items, sorted by task so that a batch
                                           holds prompts of similar length
    -> answers                             map_batches over an actor pool, each actor holding
                                           the model (GPU or CPU) on one of two engines:
         hf    Predictor                   transformers' generate in static batches of
                                           eval.batch_size: a batch waits for its longest answer
         vllm  VLLMPredictor               the vision side writes prompt embeddings; one vLLM
                                           engine per base LLM generates them with continuous
                                           batching, every checkpoint over that base a LoRA
                                           adapter of it (model/vllm_engine.py)
    -> predictions.parquet                 one row per (sample, mode)

Report generation runs in the mode of `eval.cot` ("cot": the findings question first, the
model's own answer kept in the conversation, then the report question; "no_cot": the report
question alone) and, with `eval.both_cot_modes`, in the other mode too. On vLLM a CoT report's
second turn goes into the engine as soon as its first answer is back. With
`eval.grounded_reports`, each sentence of a report in the first mode that states a present
finding is then asked for its box on the study's first image (report_grounding.py). Phrase
grounding and VQA ask the sample's own question. A sample that cannot be run (a missing image, a prompt the engine
refuses) becomes a row with an `error`; the scorer counts those and never drops them silently.

Ray Data's own LLM stage (ray.data.llm's vLLMEngineProcessorConfig) takes a prompt as text or
token ids only, and images through a vLLM model class, which M4CXR does not have
(serve_apps/README.md says why): it cannot carry prompt embeddings, hence VLLMPredictor. Its
ServeDeploymentProcessorConfig could call the model application's deployment, but then every
evaluation and every sweep trial would first deploy a Serve application (controller, proxy,
replicas) and send its images through Serve handles; an actor holding the same engine does it
without them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from m4cxr.config import Experiment
from m4cxr.data.schema import ImageStore, samples_path
from m4cxr.model.checkpoint import load_checkpoint, read_experiment
from m4cxr.model.tokenizer import encode_conversation
from m4cxr.model.vllm_engine import resolve_engine, start_engines, vllm_installed
from m4cxr.ray_cluster import init_ray
from m4cxr.report_grounding import grounded_sentence, grounding_question, sentences_to_ground
from m4cxr.tasks import after_findings, single_turn_report_conversation, task_type

log = logging.getLogger(__name__)

PREDICTION_SCHEMA = pa.schema([
    ("request", pa.int64()),  # its place in the evaluation's order, which the table keeps
    ("sample_id", pa.string()),
    ("task", pa.string()),
    ("task_type", pa.string()),
    ("dataset", pa.string()),
    ("mode", pa.string()),  # cot | no_cot for report generation, "" otherwise
    ("findings", pa.string()),  # the model's answer to the findings question (cot)
    ("prediction", pa.string()),  # the final answer: the report, the box, the VQA answer
    ("reference", pa.string()),
    ("error", pa.string()),
    ("checkpoint", pa.string()),  # the name of the checkpoint that answered (run_inference's keys)
    ("generated_tokens", pa.int64()),  # over every turn of the request
    ("grounded", pa.string()),  # JSON: the report's sentences with their boxes (grounded reports), or ""
])
PROGRESS_EVERY_S = 10.0


def cot_modes(exp: Experiment) -> list[str]:
    first = "cot" if exp.eval.cot else "no_cot"
    return [first, "no_cot" if exp.eval.cot else "cot"] if exp.eval.both_cot_modes else [first]


def eval_requests(exp: Experiment, corpus_dir: str | Path, checkpoints: list[str] = ("default",)) -> list[dict[str, Any]]:
    """(row, mode, checkpoint) of the evaluated tasks in the test split, grouped by task."""
    table = pq.read_table(samples_path(corpus_dir, exp.eval.split), columns=["task", "dataset"])
    tasks = np.array(table.column("task").to_pylist())
    datasets = np.array(table.column("dataset").to_pylist())
    requests = []
    for task in exp.eval.tasks:
        chosen = tasks == task
        if task in exp.eval.datasets:
            chosen &= np.isin(datasets, exp.eval.datasets[task])
        rows = np.flatnonzero(chosen)
        if not len(rows):
            named = f" of {exp.eval.datasets[task]}" if task in exp.eval.datasets else ""
            log.warning("eval: no %s samples%s for task %s; it is left out of the tables", exp.eval.split, named, task)
        if exp.eval.samples_per_task:
            rows = rows[:exp.eval.samples_per_task]
        modes = cot_modes(exp) if task_type(task) == "mrg" else [""]
        requests += [{"row": int(r), "mode": m, "checkpoint": c} for c in checkpoints for m in modes for r in rows]
    return [dict(r, request=i) for i, r in enumerate(requests)]


def choose_engine(exp: Experiment, requests: int) -> str:
    """eval.engine, with "auto" read as vLLM where it is installed, on GPU, for an evaluation long
    enough (eval.vllm_from_requests) for its start-up to pay; transformers otherwise. On CPU
    vLLM's rate is below transformers' static batches (benchmarks/eval_throughput.py)."""
    if exp.eval.engine == "auto":
        use_vllm = vllm_installed() and exp.eval.use_gpu and requests >= exp.eval.vllm_from_requests
        return "vllm" if use_vllm else "hf"
    return resolve_engine(exp.eval.engine)


class Requests:
    """What both engines' actors share: the split's samples and images, the rows they fill, and
    the context limit: the longest sequence a checkpoint was trained on and a whole answer after
    it (training leaves longer samples out; so does evaluation, as errors)."""

    def __init__(self, checkpoints: dict[str, str], corpus_dir: str, split: str, max_new_tokens: int,
                 grounded_mode: str = ""):
        self.grounded_mode = grounded_mode  # the report mode whose reports are grounded ("": none)
        self.table = pq.read_table(samples_path(corpus_dir, split))
        self.store = ImageStore(corpus_dir)
        self.max_new_tokens = max_new_tokens
        self.context = {name: read_experiment(f).train.max_seq_len + max_new_tokens for name, f in checkpoints.items()}
        self.models: dict = {}  # name -> the model (or its vision side), loaded by the engine's actor

    def too_long(self, name: str, conversation: list[dict]) -> str:
        model = self.models[name]
        ids, _ = encode_conversation(model.tokenizer, conversation[:2], model.tokens_per_image, for_generation=True)
        if len(ids) + self.max_new_tokens <= self.context[name]:
            return ""
        return (f"the prompt is {len(ids)} tokens; with {self.max_new_tokens} new tokens it is over the context "
                f"of {self.context[name]} (train.max_seq_len + eval.max_new_tokens)")

    def images(self, sample: dict) -> list:
        out = []
        for ref in sample["images"]:
            with self.store.load(ref["image_id"]) as im:
                im.load()
                out.append(im.copy())
        return out

    def open(self, batch: dict[str, np.ndarray]) -> list[tuple[dict, dict, list, list]]:
        """(output row, sample, conversation, images) per request; a request whose images cannot
        be read gets its error here, and no conversation."""
        samples = self.table.take(np.asarray(batch["row"], dtype=np.int64)).to_pylist()
        out = []
        for s, mode, name, request in zip(samples, batch["mode"], batch["checkpoint"], batch["request"]):
            row = {"request": int(request), "sample_id": s["sample_id"], "task": s["task"], "task_type": s["task_type"], "dataset": s["dataset"],
                   "mode": str(mode), "findings": "", "prediction": "", "reference": s["answer"] or "", "error": "",
                   "checkpoint": str(name), "generated_tokens": 0, "grounded": ""}
            try:
                images = self.images(s)
            except (OSError, KeyError) as err:
                row["error"] = f"{type(err).__name__}: {err}"
                out.append((row, s, [], []))
                continue
            turns = single_turn_report_conversation(s) if mode == "no_cot" else s["turns"]
            row["error"] = self.too_long(row["checkpoint"], turns)
            out.append((row, s, turns, images))
        return out

    def grounds(self, row: dict) -> bool:
        return row["task_type"] == "mrg" and row["mode"] == self.grounded_mode and not row["error"]

    @staticmethod
    def grounding_questions(sample: dict, images: list, report: str) -> tuple[list, list]:
        """The report's (sentence, findings stated), and per sentence stating a present finding
        (its index, the grounding question, [the study's first image])."""
        sentences = sentences_to_ground(report)
        image = images[[i["role"] for i in sample["images"]].index("current")]
        system = sample["turns"][0]["content"]
        return sentences, [(k, grounding_question(text, system), [image])
                           for k, (text, findings) in enumerate(sentences) if findings]


def grounded_json(sentences: list[tuple[str, list[str]]], answers: dict[int, str]) -> str:
    return json.dumps([grounded_sentence(text, findings, answers.get(k)) for k, (text, findings) in enumerate(sentences)])


def model_dtype(use_gpu: bool):
    # bf16 on GPU as trained; fp32 on CPU, where batched and one-by-one greedy answers agree
    return torch.bfloat16 if use_gpu else None


class Predictor(Requests):
    """Ray Data actor on transformers: a batch of requests -> predictions, in static passes
    (every prompt's first question, then the CoT reports' second, then the grounding questions
    of the reports' finding sentences)."""

    def __init__(self, checkpoints: dict[str, str], corpus_dir: str, split: str, max_new_tokens: int, decoding: str,
                 use_gpu: bool, seed: int = 0, engine_args: dict | None = None, grounded_mode: str = ""):
        super().__init__(checkpoints, corpus_dir, split, max_new_tokens, grounded_mode)
        device = "cuda" if use_gpu else "cpu"
        self.models = {name: load_checkpoint(folder, device=device, dtype=model_dtype(use_gpu))[0]
                       for name, folder in checkpoints.items()}
        self.generation = dict(max_new_tokens=max_new_tokens, do_sample=decoding == "sample", seed=seed)

    def generate(self, items: list[tuple[dict, list, list]]) -> list[dict]:
        """items (output row, conversation, images) -> the answers' details, a pass per checkpoint."""
        details: list[dict] = [{}] * len(items)
        for name, model in self.models.items():
            idx = [i for i, (row, _, _) in enumerate(items) if row["checkpoint"] == name]
            if idx:
                answers = model.generate_details([items[i][1] for i in idx], [items[i][2] for i in idx], **self.generation)
                for i, answer in zip(idx, answers):
                    details[i] = answer
        return details

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        opened = self.open(batch)
        ready = [(row, turns, images) for row, _, turns, images in opened if not row["error"]]
        # one pass for every prompt that ends at its first question; CoT prompts then go on
        cot = []
        for (row, turns, images), answer in zip(ready, self.generate([(r, t[:2], im) for r, t, im in ready])):
            row["generated_tokens"] = answer["completion_tokens"]
            if row["mode"] == "cot":
                row["findings"] = answer["text"]
                cot.append((row, after_findings(turns[:2], answer["text"], turns[3:4]), images))
            else:
                row["prediction"] = answer["text"]
        for (row, _, _), answer in zip(cot, self.generate(cot)):
            row["prediction"] = answer["text"]
            row["generated_tokens"] += answer["completion_tokens"]
        self.ground([(row, sample, images) for row, sample, _, images in opened if self.grounds(row)])
        return pa.Table.from_pylist([row for row, _, _, _ in opened], schema=PREDICTION_SCHEMA)

    def ground(self, reports: list[tuple[dict, dict, list]]) -> None:
        """A third pass: the grounding questions of every finished report's finding sentences."""
        questions, sentences = [], []
        for row, sample, images in reports:
            said, asked = self.grounding_questions(sample, images, row["prediction"])
            sentences.append(said)
            questions += [(row, k, conversation, image) for k, conversation, image in asked]
        answers = self.generate([(row, conversation, image) for row, _, conversation, image in questions])
        answer_of: dict[int, dict[int, str]] = {}
        for (row, k, _, _), answer in zip(questions, answers):
            answer_of.setdefault(id(row), {})[k] = answer["text"]
            row["generated_tokens"] += answer["completion_tokens"]
        for (row, _, _), said in zip(reports, sentences):
            row["grounded"] = grounded_json(said, answer_of.get(id(row), {}))


class VLLMPredictor(Requests):
    """Ray Data actor on vLLM: the vision side of every checkpoint, and one engine per base LLM.
    Every request of a batch goes into the engine at once (Ray Data hands an async actor several
    batches at a time), so the engine batches continuously across them."""

    def __init__(self, checkpoints: dict[str, str], corpus_dir: str, split: str, max_new_tokens: int, decoding: str,
                 use_gpu: bool, seed: int = 0, engine_args: dict | None = None, grounded_mode: str = ""):
        from vllm import SamplingParams

        self.engines: dict = {}  # first: __del__ reads it
        super().__init__(checkpoints, corpus_dir, split, max_new_tokens, grounded_mode)
        device = "cuda" if use_gpu else "cpu"
        self.models = {name: load_checkpoint(folder, device, model_dtype(use_gpu), False, "embeddings")[0]
                       for name, folder in checkpoints.items()}
        self.engines = start_engines(checkpoints, max(self.context.values()), use_gpu, engine_args)
        greedy = decoding == "greedy"
        self.params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0 if greedy else 1.0,
                                     seed=None if greedy else seed)

    def close(self) -> None:
        """Stop the engines' processes (Ray Data ends its actors; this runs as they go)."""
        for engine in set(self.engines.values()):
            try:
                engine.shutdown()
            except Exception:  # an engine whose process died has nothing left to stop
                log.warning("a vLLM engine did not shut down cleanly", exc_info=True)
        self.engines = {}

    def __del__(self):
        self.close()

    def embed(self, name: str, conversations: list[list[dict]], images: list[list]) -> list[torch.Tensor]:
        with torch.inference_mode():
            return self.models[name].embed_prompts(conversations, images)

    async def complete(self, name: str, embeds: torch.Tensor) -> tuple[str, int]:
        out = (await self.engines[name].complete(name, embeds, self.params)).outputs[0]
        return out.text.strip(), len(out.token_ids)  # stripped as transformers' answers are

    async def answer(self, row: dict, turns: list[dict], images: list, embeds: torch.Tensor) -> None:
        from vllm.exceptions import VLLMValidationError

        try:
            text, tokens = await self.complete(row["checkpoint"], embeds)
            row["generated_tokens"] = tokens
            if row["mode"] != "cot":
                row["prediction"] = text
                return
            row["findings"] = text
            second = after_findings(turns[:2], text, turns[3:4])
            embeds = (await asyncio.to_thread(self.embed, row["checkpoint"], [second], [images]))[0]
            row["prediction"], tokens = await self.complete(row["checkpoint"], embeds)
            row["generated_tokens"] += tokens
        except VLLMValidationError as err:  # a prompt the engine refuses (too long): this request's error
            row["error"] = f"the engine refused the request: {err}"

    async def ground(self, row: dict, sample: dict, images: list) -> None:
        """The grounding questions of the report's finding sentences, all at once into the engine."""
        sentences, asked = self.grounding_questions(sample, images, row["prediction"])
        answers = {}
        if asked:
            embeds = await asyncio.to_thread(self.embed, row["checkpoint"], [c for _, c, _ in asked],
                                             [im for _, _, im in asked])
            done = await asyncio.gather(*(self.complete(row["checkpoint"], e) for e in embeds))
            answers = {k: text for (k, _, _), (text, _) in zip(asked, done)}
            row["generated_tokens"] += sum(tokens for _, tokens in done)
        row["grounded"] = grounded_json(sentences, answers)

    async def answer_and_ground(self, row: dict, sample: dict, turns: list[dict], images: list,
                                embeds: torch.Tensor) -> None:
        await self.answer(row, turns, images, embeds)
        if self.grounds(row):
            await self.ground(row, sample, images)

    async def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        opened = self.open(batch)
        work = []
        for name in self.models:  # the first turns of a checkpoint's requests go through its vision encoder together
            ready = [(row, s, turns, images) for row, s, turns, images in opened
                     if not row["error"] and row["checkpoint"] == name]
            if ready:
                embeds = await asyncio.to_thread(self.embed, name, [t[:2] for _, _, t, _ in ready],
                                                 [im for _, _, _, im in ready])
                work += [self.answer_and_ground(row, s, turns, images, e) for (row, s, turns, images), e in zip(ready, embeds)]
        await asyncio.gather(*work)
        return pa.Table.from_pylist([row for row, _, _, _ in opened], schema=PREDICTION_SCHEMA)


def collect(ds: ray.data.Dataset, total: int, engine: str) -> pa.Table:
    """The predictions as they come, logged: done/total, and the rates since the first answers
    came back (start-up left out)."""
    tables, done, started = [], 0, time.time()
    first = last_log = None
    tokens_at_first = tokens = done_at_first = 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        tables.append(batch)
        done += batch.num_rows
        tokens += pc.sum(batch.column("generated_tokens")).as_py() or 0
        now = time.time()
        if first is None:
            first, last_log, done_at_first, tokens_at_first = now, now, done, tokens
            log.info("eval (%s): first answers after %.0fs; %d/%d requests", engine, now - started, done, total)
        elif now - last_log >= PROGRESS_EVERY_S or done == total:
            last_log = now
            span = now - first
            log.info("eval (%s): %d/%d requests; %.1f requests/s, %.0f generated tokens/s", engine, done, total,
                     (done - done_at_first) / span, (tokens - tokens_at_first) / span)
    return pa.concat_tables(tables).cast(PREDICTION_SCHEMA) if tables else PREDICTION_SCHEMA.empty_table()


def run_inference(exp: Experiment, checkpoint: str | Path | dict[str, str], corpus_dir: str | Path,
                  out: str | Path, engine: str | None = None) -> pa.Table:
    """Predictions for the evaluated test samples, written to `out` (Parquet) and returned.
    `checkpoint`: one folder, or {name: folder} to evaluate several at once (on vLLM those over
    one base share its engine); `engine` overrides eval.engine."""
    init_ray()
    checkpoints = ({k: str(Path(v).resolve()) for k, v in checkpoint.items()} if isinstance(checkpoint, dict)
                   else {"default": str(Path(checkpoint).resolve())})
    requests = eval_requests(exp, corpus_dir, list(checkpoints))
    if not requests:
        raise ValueError(f"nothing to evaluate: no samples of tasks {exp.eval.tasks} in the "
                         f"{exp.eval.split} split of {corpus_dir}")
    engine = resolve_engine(engine) if engine else choose_engine(exp, len(requests))
    log.info("eval: %d requests on the %s engine", len(requests), engine)
    args = dict(checkpoints=checkpoints, corpus_dir=str(Path(corpus_dir).resolve()), split=exp.eval.split,
                max_new_tokens=exp.eval.max_new_tokens, decoding=exp.eval.decoding, use_gpu=exp.eval.use_gpu,
                seed=exp.train.seed, engine_args=dict(exp.eval.engine_args),
                grounded_mode=cot_modes(exp)[0] if exp.eval.grounded_reports else "")
    if exp.eval.engine_args and engine != "vllm":  # vLLM's settings would be silently unused
        raise ValueError(f"eval.engine_args {sorted(exp.eval.engine_args)} are vLLM's, but the engine here is {engine!r}")
    ds = ray.data.from_items(requests).map_batches(
        VLLMPredictor if engine == "vllm" else Predictor, fn_constructor_kwargs=args,
        batch_size=exp.eval.vllm_batch_size if engine == "vllm" else exp.eval.batch_size,
        compute=ray.data.ActorPoolStrategy(size=exp.eval.actors), num_cpus=exp.eval.cpus_per_actor,
        num_gpus=1 if exp.eval.use_gpu else 0,
    )
    # in the requests' order, whichever order the actors answered in: bootstrap intervals
    # resample by position, so the same answers give the same intervals
    table = collect(ds, len(requests), engine).sort_by("request").replace_schema_metadata({"engine": engine})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return table
