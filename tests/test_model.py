"""The M4CXR model: the tiny quickstart model (same classes as the paper's, random weights)."""

import json

import pytest
import torch

from m4cxr.cli import main
from m4cxr.config import load_experiment
from m4cxr.data.schema import ImageStore, read_samples
from m4cxr.model.checkpoint import export_merged, load_checkpoint, save_checkpoint
from m4cxr.model.inputs import generate_reports
from m4cxr.model.m4cxr import build_model, resolve_attention
from m4cxr.model.tokenizer import IGNORE, corpus_texts, encode_conversation, train_tiny_tokenizer

from conftest import ROOT

OVERFIT_TASKS = ["single_image", "multi_image", "multi_study", "finding_grounding", "organ_grounding", "vqa",
                 "difference_vqa", "grounded_anatomical_region"]


@pytest.fixture(scope="module")
def world(synthetic_corpus):
    corpus, _ = synthetic_corpus
    samples = read_samples(corpus, "train")
    tok = train_tiny_tokenizer(corpus_texts(s.turns for s in samples), 2000)
    exp = load_experiment(ROOT / "experiments/quickstart.yaml")
    store = ImageStore(corpus)
    return exp, tok, samples, store


def images_of(store, sample):
    return [store.load(i["image_id"]) for i in sample.images]


def fresh_model(world, seed=0):
    exp, tok, _, _ = world
    torch.manual_seed(seed)
    return build_model(exp, tok)


def test_loss_mask_token_by_token(world):
    exp, tok, samples, _ = world
    sample = next(s for s in samples if s.task == "visual_instruction_following" and len(s.turns) == 5)
    ids, labels = encode_conversation(tok, sample.turns, tokens_per_image=16)
    assert len(ids) == len(labels)
    # walk the sequence: every labelled token is an assistant token or the EOS closing it,
    # every other token is masked, and the labelled runs decode to the assistant turns
    runs, current = [], []
    for i, (t, y) in enumerate(zip(ids, labels)):
        if y == IGNORE:
            if current:
                runs.append(current)
                current = []
        else:
            assert y == t, f"label {y} differs from input {t} at {i}"
            current.append(t)
    if current:
        runs.append(current)
    answers = [t["content"] for t in sample.turns if t["role"] == "assistant"]
    assert len(runs) == len(answers) == 2
    for run, answer in zip(runs, answers):
        assert run[-1] == tok.eos_token_id
        assert tok.decode(run[:-1]).strip() == answer
    # the image placeholder became 16 image tokens, all masked
    img = tok.convert_tokens_to_ids("<image>")
    assert ids.count(img) == 16 and all(labels[i] == IGNORE for i, t in enumerate(ids) if t == img)
    # and the same text is what the saved chat template produces (each answer is encoded as a
    # piece of its own, so the word-start mark of its first token decodes as a space)
    decoded = tok.decode(ids).replace("<image>" * 16, "<image>").replace("[/INST] ", "[/INST]")
    assert decoded == tok.apply_chat_template(sample.turns, tokenize=False)


def test_images_are_spliced_into_their_positions(world):
    exp, tok, samples, store = world
    model = fresh_model(world).eval()
    by_count = {}
    for s in samples:
        by_count.setdefault(len(s.images), s)
    picks = [by_count[1], by_count[2], max((s for s in samples), key=lambda s: len(s.images))]
    assert [len(p.images) for p in picks][:2] == [1, 2] and len(picks[2].images) >= 4
    convs = [p.turns for p in picks]
    images = [images_of(store, p) for p in picks]
    batch = model.collate(convs, images)
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])
        visual = model.encode_images(batch["pixel_values"])  # images in sample order
        text = model.llm.get_input_embeddings()(batch["input_ids"].clamp(max=len(tok) - 1))
    img = model.image_token_id
    k = 0
    for row, p in enumerate(picks):
        positions = (batch["input_ids"][row] == img).nonzero().flatten()
        assert len(positions) == 16 * len(p.images)
        for j in range(len(p.images)):
            span = positions[16 * j: 16 * (j + 1)]
            assert (span.diff() == 1).all()  # each image is one contiguous run
            assert torch.equal(embeds[row, span], visual[k])
            k += 1
        other = batch["input_ids"][row] != img
        assert torch.equal(embeds[row, other], text[row, other])
    assert k == len(visual)
    # five images in one sample (the multi-image maximum), each in its own run, in order
    from m4cxr.tasks import cot_candidates, render_conversation

    five_turns = render_conversation("multi_image", {"images": 5, "findings": cot_candidates(), "positives": [],
                                                     "report": "Clear."})
    five_images = [store.load(s.images[0]["image_id"]) for s in samples[:5]]
    b5 = model.collate([five_turns], [five_images])
    with torch.no_grad():
        e5 = model.embed(b5["input_ids"], b5["pixel_values"])
        v5 = model.encode_images(b5["pixel_values"])
    pos5 = (b5["input_ids"][0] == img).nonzero().flatten()
    assert len(pos5) == 80
    for j in range(5):
        assert torch.equal(e5[0, pos5[16 * j: 16 * (j + 1)]], v5[j])
    # a wrong number of images is an error, not a silent misalignment
    with pytest.raises(ValueError, match="each <image> must match one image"):
        model.embed(batch["input_ids"], batch["pixel_values"][:-1])


def task_picks(samples):
    """The first sample of each of OVERFIT_TASKS (a finding grounding one with boxes)."""
    return [next(s for s in samples if s.task == t and (t != "finding_grounding" or s.boxes)) for t in OVERFIT_TASKS]


def overfit(world, steps=300):
    exp, tok, samples, store = world
    model = fresh_model(world, seed=1)
    picks = task_picks(samples)
    model.set_trainable(["vision_encoder", "projector", "llm_lora", "llm"])
    batch = model.collate([p.turns for p in picks], [images_of(store, p) for p in picks])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if loss.item() < 0.01:
            break
    return model.eval(), picks, losses


@pytest.fixture(scope="module")
def overfitted(world):
    return overfit(world)


@pytest.mark.slow  # trains for 300 steps
def test_tiny_model_overfits_multitask_conversations(world, overfitted):
    _, _, _, store = world
    model, picks, losses = overfitted
    assert losses[0] > 3 and losses[-1] < 0.05, (losses[0], losses[-1])
    # greedy generation reproduces each final answer, box strings included
    answers = model.generate([p.turns for p in picks], [images_of(store, p) for p in picks], max_new_tokens=120)
    for p, answer in zip(picks, answers):
        assert answer == p.turns[-1]["content"], p.task
    assert any("[" in p.turns[-1]["content"] for p in picks)
    # chain of thought: the findings answer is asked for, appended, then the report
    single = picks[0]
    out = generate_reports(model, [{"scenario": "single_image", "images": images_of(store, single)}], max_new_tokens=120)
    assert out[0]["findings"] == single.turns[2]["content"]
    assert out[0]["report"] == single.report
    study = picks[2]
    n_prior = sum(i["role"] == "prior" for i in study.images)
    imgs = images_of(store, study)
    out = generate_reports(model, [{"scenario": "multi_study", "images": imgs[n_prior:], "prior_images": imgs[:n_prior],
                                   "prior_report": study.prior_report}], max_new_tokens=120)
    assert out[0]["report"] == study.report


@pytest.mark.slow  # the overfitted model
def test_batched_greedy_equals_one_by_one(world, overfitted):
    _, _, samples, store = world
    model, picks, _ = overfitted
    # different lengths and image counts in one left-padded batch, on seen and unseen samples
    convs = [p.turns for p in picks[:4]] + [s.turns for s in samples[-3:]]
    imgs = [images_of(store, p) for p in picks[:4]] + [images_of(store, s) for s in samples[-3:]]
    batched = model.generate(convs, imgs, max_new_tokens=40)
    single = [model.generate([c], [i], max_new_tokens=40)[0] for c, i in zip(convs, imgs)]
    assert batched == single
    untrained = fresh_model(world).eval()
    assert untrained.generate(convs, imgs, max_new_tokens=15) == [
        untrained.generate([c], [i], max_new_tokens=15)[0] for c, i in zip(convs, imgs)]


def test_sampling_is_seeded_and_differs_from_greedy(world):
    _, _, samples, store = world
    model = fresh_model(world).eval()
    convs, imgs = [samples[0].turns], [images_of(store, samples[0])]
    a = model.generate(convs, imgs, max_new_tokens=20, do_sample=True, temperature=1.5, seed=3)
    b = model.generate(convs, imgs, max_new_tokens=20, do_sample=True, temperature=1.5, seed=3)
    c = model.generate(convs, imgs, max_new_tokens=20, do_sample=True, temperature=1.5, seed=4)
    greedy = model.generate(convs, imgs, max_new_tokens=20)
    assert a == b  # the same seed, the same sample
    assert a != c and a != greedy  # another seed, another sample; neither is the greedy answer


def test_checkpoint_round_trip_and_merged_export(world, tmp_path):
    exp, tok, samples, store = world
    model = fresh_model(world).eval()
    with torch.no_grad():  # LoRA's B made non-zero, or the adapter and its merge would change nothing
        for n, p in model.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    picks = task_picks(samples)
    batch = model.collate([p.turns for p in picks], [images_of(store, p) for p in picks])
    with torch.no_grad():
        before = model(**batch).logits
    save_checkpoint(model, exp, tmp_path / "ckpt")
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"m4cxr.json", "experiment.yaml", "vision", "projector.safetensors", "adapter", "llm", "tokenizer"} <= names
    assert (tmp_path / "ckpt/adapter/adapter_model.safetensors").exists()
    loaded, exp2 = load_checkpoint(tmp_path / "ckpt")
    assert exp2.name == exp.name
    with torch.no_grad():
        after = loaded(**loaded.collate([p.turns for p in picks], [images_of(store, p) for p in picks])).logits
    assert torch.equal(before, after)
    export_merged(tmp_path / "ckpt", tmp_path / "merged")
    assert not (tmp_path / "merged/adapter").exists()
    merged, _ = load_checkpoint(tmp_path / "merged")
    with torch.no_grad():
        merged_logits = merged(**merged.collate([p.turns for p in picks], [images_of(store, p) for p in picks])).logits
    assert torch.allclose(before, merged_logits, atol=1e-4)


@pytest.mark.parametrize("stage", ["pretrain", "instruction"])
def test_each_stage_trains_exactly_its_parts(world, stage):
    exp, tok, samples, store = world
    model = fresh_model(world)
    # make LoRA's B non-zero so that every part gets a gradient
    with torch.no_grad():
        for n, p in model.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    parts = getattr(exp.train, stage).trainable
    counts = model.set_trainable(parts)
    assert {k for k, v in counts.items() if v > 0} == set(parts)
    before = {k: [p.detach().clone() for p in v] for k, v in model.parts().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    picks = samples[:3]
    loss = model(**model.collate([s.turns for s in picks], [images_of(store, s) for s in picks])).loss
    loss.backward()
    opt.step()
    for name, params in model.parts().items():
        changed = any(not torch.equal(a, b) for a, b in zip(before[name], params))
        assert changed == (name in parts), (stage, name)


def test_pretrained_parts_load_from_local_folders(world, tmp_path):
    """The real-run path: encoder, LLM and tokenizer from folders (as from hub ids), the tokenizer
    without an <image> token (added, outside the LLM's vocabulary, as with Mistral's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Dinov2Config, Dinov2Model, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    from m4cxr.config import experiment_from_dict
    from m4cxr.model.tokenizer import load_tokenizer

    exp, _, samples, store = world
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator([t["content"] for s in samples[:200] for t in s.turns],
                            trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"]))
    llm_tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    vocab = len(llm_tok)
    llm_tok.save_pretrained(tmp_path / "llm")
    MistralForCausalLM(MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "llm")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=112)).save_pretrained(tmp_path / "vision")
    tok = load_tokenizer(str(tmp_path / "llm"))
    assert tok.convert_tokens_to_ids("<image>") >= vocab and tok.pad_token is not None
    cfg = experiment_from_dict({"data": {"image_size": 112}, "model": {
        "vision_encoder": str(tmp_path / "vision"), "llm": str(tmp_path / "llm"), "attention": "sdpa",
        "projector": {"depth": 1, "hidden_size": 32, "num_query_tokens": 16}}})
    model = build_model(cfg, tok)
    assert model.llm.get_input_embeddings().num_embeddings == vocab  # no resize needed
    pick = samples[0]
    out = model(**model.collate([pick.turns], [images_of(store, pick)]))
    assert torch.isfinite(out.loss)


def test_flash_attention_without_the_package_is_a_clear_error():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="needs the flash-attn package"):
            resolve_attention("flash_attention_2", on_gpu=True)
    assert resolve_attention("auto", on_gpu=False) == "sdpa"


def test_full_size_summary(capsys):
    assert main(["model", "summary", str(ROOT / "experiments/m4cxr.yaml"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"]["llm"] == 7_241_732_096
    assert 80e6 < info["params"]["vision"] < 100e6
    assert 37e6 < info["params"]["projector"] < 39.5e6
    assert info["lora_params"] == 3_407_872
    assert info["encoder_tokens_per_image"] == 1369 and info["visual_tokens_per_image"] == 361
    assert info["trainable"]["pretrain"] == info["params"]["projector"]
    assert info["trainable"]["instruction"] == info["params"]["vision"] + info["params"]["projector"] + 3_407_872
