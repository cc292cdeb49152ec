"""Packed sequences (data.packing): the same loss, gradients and per-task losses as padded
micro-batches, on the tiny quickstart model in float32 on CPU; generation does not pack."""

import json

import numpy as np
import pytest
import torch

from m4cxr.config import load_experiment
from m4cxr.data.pipeline import PrepareSamples, pack_rows, prepare_args, step_batches
from m4cxr.model.m4cxr import build_model, packed_attention_kwargs
from m4cxr.model.tokenizer import encode_conversation, load_tokenizer
from m4cxr.train.loop import step_targets, token_losses
from m4cxr.train.run import prepare_tokenizer

from conftest import ROOT

IMAGE_SIZE = 112  # the quickstart encoder's
NORM = ([0.5307] * 3, [0.2583] * 3)  # its image mean and std


@pytest.fixture(scope="module")
def world(synthetic_corpus):
    corpus, _ = synthetic_corpus
    exp = load_experiment(ROOT / "experiments/quickstart.yaml", [f"data.corpus_dir={corpus}"])
    tok_dir = prepare_tokenizer(exp, corpus)
    prep = PrepareSamples(**prepare_args(exp, str(corpus), "train", tok_dir, 16, "instruction"))
    return exp, str(corpus), tok_dir, prep


def fresh_model(world, attention="sdpa"):
    exp, _, tok_dir, _ = world
    exp = load_experiment(ROOT / "experiments/quickstart.yaml", [f"model.attention={attention}"])
    torch.manual_seed(0)
    model = build_model(exp, load_tokenizer(tok_dir))
    with torch.no_grad():  # LoRA's B non-zero, so that the adapters get gradients through everything
        for n, p in model.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.set_trainable(["vision_encoder", "projector", "llm_lora", "llm"])
    return model.train()


def stream_rows(prep, samples):
    """Rows as the Train worker gets them from Ray Data, for samples given as dicts of the
    samples table; text-only samples are written here (the corpus has none)."""
    out = {k: [] for k in ("sample_id", "task_type", "error", "input_ids", "labels", "pixels", "n_images")}
    for k, s in enumerate(samples):
        if s["images"]:
            p = prep.prepare(s, k)
        else:
            ids, labels = encode_conversation(prep.tokenizer, s["turns"], prep.tokens_per_image)
            p = {"sample_id": s["sample_id"], "task_type": s["task_type"], "error": "", "n_images": 0,
                 "input_ids": np.asarray(ids, np.int32).tobytes(), "labels": np.asarray(labels, np.int32).tobytes(),
                 "pixels": b""}
        assert not p["error"], p["error"]
        for key in out:
            out[key].append(p[key])
    return {k: np.array(v, dtype=object) for k, v in out.items()}


def text_only(sample):
    turns = [{**t, "content": t["content"].replace("<image>", "").strip()} for t in sample["turns"]]
    return {**sample, "sample_id": sample["sample_id"] + "/text", "images": [], "turns": turns}


def picks(prep, kind):
    table = prep.table.to_pylist()
    multi = [s for s in table if len(s["images"]) >= 2][:6]
    others = [s for s in table if s["task_type"] != "mrg"][:4]
    if kind == "multi_image":
        return multi + others
    if kind == "text_only":
        return [text_only(s) for s in multi[:3] + others]
    return multi[:3] + [text_only(s) for s in others]  # both in one step


def run_step(model, batches):
    """The training loop's step: every micro-batch's summed loss over the step's targets, backward;
    returns the step loss, the per-sample and per-task losses and the gradients."""
    model.zero_grad(set_to_none=True)
    targets = step_targets(batches)
    total, per_sample, per_task = 0.0, {}, {}
    for batch in batches:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch.get("position_ids"), pixel_values=batch["pixel_values"])
        loss_sum, n = token_losses(out.logits, batch["labels"], batch.get("sample_index"))
        (loss_sum.sum() / targets).backward()
        total += float(loss_sum.detach().sum())
        for sid, t, ls, nn_ in zip(batch["sample_id"], batch["task_type"], loss_sum.tolist(), n.tolist()):
            per_sample[sid] = (ls, nn_)
            per_task.setdefault(t, [0.0, 0])
            per_task[t][0] += ls
            per_task[t][1] += nn_
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, targets, per_sample, per_task, grads


def assert_close(a, b, what):
    """Equal to float32 rounding: within 1e-5 of the tensor's largest entry (the key biases'
    gradients, zero in exact arithmetic, are rounding noise of 1e-12)."""
    worst = (a - b).abs().max()
    assert worst <= 1e-5 * b.abs().max() + 1e-10, f"{what}: max difference {worst:.3g} of {b.abs().max():.3g}"


@pytest.mark.parametrize("kind,attention", [("multi_image", "sdpa"), ("text_only", "sdpa"), ("mixed", "eager")])
def test_packed_step_equals_padded_step(world, kind, attention):
    _, _, _, prep = world
    rows = stream_rows(prep, picks(prep, kind))
    padded, p_stats = step_batches(rows, 4, 0, IMAGE_SIZE, *NORM)
    # rows of 700 tokens: several samples per row and several rows per micro-batch
    packed, k_stats = step_batches(rows, 2, 0, IMAGE_SIZE, *NORM, pack_to=700)
    assert any(len(set(b["sample_index"][r][b["sample_index"][r] >= 0].tolist())) >= 2
               for b in packed for r in range(len(b["input_ids"])))  # samples do share rows
    assert k_stats["tokens"] == p_stats["tokens"] and k_stats["rows"] == p_stats["rows"]
    model = fresh_model(world, attention)
    total_p, targets_p, samples_p, tasks_p, grads_p = run_step(model, padded)
    total_k, targets_k, samples_k, tasks_k, grads_k = run_step(model, packed)
    assert targets_k == targets_p
    assert total_k == pytest.approx(total_p, rel=1e-5)
    assert samples_k.keys() == samples_p.keys()
    for sid, (ls, n) in samples_p.items():  # each sample's loss is its own, to float32 rounding
        assert samples_k[sid][1] == n and samples_k[sid][0] == pytest.approx(ls, rel=1e-5, abs=1e-4), sid
    assert tasks_k.keys() == tasks_p.keys()
    for t in tasks_p:
        assert tasks_k[t][1] == tasks_p[t][1] and tasks_k[t][0] == pytest.approx(tasks_p[t][0], rel=1e-5), t
    assert grads_k.keys() == grads_p.keys()
    assert any(n.startswith("vision") for n in grads_p) == (kind != "text_only")
    for name in grads_p:
        assert_close(grads_k[name], grads_p[name], name)


def test_packing_leaks_nothing_between_samples(world):
    """Changing one sample changes no other sample's logits in its packed row."""
    _, _, _, prep = world
    samples = picks(prep, "mixed")[:4]
    rows = stream_rows(prep, samples)
    (batch,), _ = step_batches(rows, 1, 0, IMAGE_SIZE, *NORM, pack_to=10_000)  # all in one row
    model = fresh_model(world).eval()
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       pixel_values=batch["pixel_values"]).logits
        first = batch["sample_index"][0] == 0
        changed = batch["input_ids"].clone()
        text = first & (changed != model.image_token_id)
        changed[text] = torch.randint(10, 200, (int(text.sum()),))
        pixels = batch["pixel_values"].clone()
        pixels[: rows["n_images"][list(rows["sample_id"]).index(batch["sample_id"][0])]] = 0.0
        after = model(input_ids=changed, position_ids=batch["position_ids"], pixel_values=pixels).logits
    assert not torch.allclose(before[0, first], after[0, first])
    assert torch.equal(before[0, ~first], after[0, ~first])


def test_generation_does_not_pack_and_agrees_with_the_packed_view(world):
    _, _, _, prep = world
    model = fresh_model(world).eval()
    table = prep.table.to_pylist()
    sample = next(s for s in table if len(s["images"]) >= 2)
    images = [prep.store.load(i["image_id"]) for i in sample["images"]]
    prompt = sample["turns"][:2]  # system and the first question
    gen = model.collate([prompt], [images], for_generation=True)
    assert "position_ids" not in gen and gen["attention_mask"].all()
    with torch.no_grad():
        first_token = model.llm.generate(inputs_embeds=model.embed(gen["input_ids"], gen["pixel_values"]),
                                         attention_mask=gen["attention_mask"], max_new_tokens=1, do_sample=False,
                                         pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        # the same prompt packed after another sample, as training sees it
        other = next(s for s in table if s["task_type"] != "mrg")
        rows = stream_rows(prep, [other, {**sample, "turns": prompt, "sample_id": "prompt"}])
        (batch,), _ = step_batches(rows, 1, 0, IMAGE_SIZE, *NORM, pack_to=10_000)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       pixel_values=batch["pixel_values"]).logits
    k = batch["sample_id"].index("prompt")
    last = (batch["sample_index"][0] == k).nonzero().max()
    assert_close(logits[0, last], first_token.scores[0][0], "next-token logits")
    assert int(logits[0, last].argmax()) == int(first_token.sequences[0, -1])


def test_pack_rows_first_fit_decreasing():
    lengths = [300, 900, 200, 500, 100, 400, 1000]
    rows = pack_rows(lengths, 1000)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    sizes = [sum(lengths[i] for i in r) for r in rows]
    assert all(s <= 1000 for s in sizes) and sizes == sorted(sizes, reverse=True)
    assert len(rows) == 4  # 3,400 tokens: 4 rows is the least
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([1001], 1000)


def test_flash_attention_arguments_and_no_mask_with_packing(world):
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    kw = packed_attention_kwargs(pos)
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 10, 12] and kw["max_length_q"] == 4
    model = fresh_model(world)
    ids = torch.full((1, 6), 10)
    with pytest.raises(ValueError, match="no attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos[:1])


@pytest.mark.slow
def test_packed_training_through_ray(ray_local, synthetic_corpus, tmp_path):
    """data.packing through the real path: Ray Data stream -> Train worker -> packed micro-batches."""
    from m4cxr.train.run import run_stage

    corpus, _ = synthetic_corpus
    args = [f"train.output_dir={tmp_path}", "train.instruction.training_steps=6", "train.instruction.max_steps=6",
            "train.instruction.global_batch_size=8", "train.micro_batch_size=2", "train.checkpoint_every=6",
            "train.log_every=2", "train.val_samples=8", "data.packing=true"]
    summary = run_stage(load_experiment(ROOT / "experiments/quickstart.yaml", args), "instruction", corpus,
                        run_name="packed")
    assert summary["steps"] == 6 and summary["val_loss_last"] < summary["val_loss_first"]
    assert summary["nonpad_token_share"] > 0.95
    rows = [json.loads(line) for line in (tmp_path / "packed/metrics.jsonl").read_text().splitlines()]
    assert all(any(k.startswith("loss_") for k in r) for r in rows)


def test_packing_key_is_checked():
    from m4cxr.config import ConfigError

    assert load_experiment(ROOT / "experiments/quickstart.yaml").data.packing is False
    assert load_experiment(ROOT / "experiments/m4cxr.yaml").data.packing is True
    with pytest.raises(ConfigError, match="'data.packing' must be bool"):
        load_experiment(ROOT / "experiments/quickstart.yaml", ["data.packing=3"])
    with pytest.raises(ConfigError, match="did you mean 'data.packing'"):
        load_experiment(ROOT / "experiments/quickstart.yaml", ["data.packin=true"])
