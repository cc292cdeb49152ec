"""The real tokenizer of Mistral-7B-Instruct-v0.2, built from the SentencePiece model that
mistral-common ships (tokenizer.model.v1, 32,000 pieces): every task's ids equal the authors'
encoding, i.e. their template text (written out in tests/test_templates.py) in their Mistral
format, split at <image>, [INST] and [/INST], each piece encoded by SentencePiece itself; the
loss covers exactly the answers; `<image>` expands to the visual tokens without moving any
other id."""

import re
import shutil
from pathlib import Path

import pytest

from m4cxr.tasks import render_conversation, task_names
from m4cxr.model.tokenizer import IGNORE, encode_conversation, image_token_id, load_tokenizer

from test_templates import AUTHORS, FIELDS, expected_turns

mistral_common = pytest.importorskip("mistral_common")
SENTENCEPIECE_MODEL = Path(mistral_common.__file__).parent / "data/tokenizer.model.v1"
SYSTEM = ("The following is a conversation between a curious human and an AI medical assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SCENARIOS = ("single_image", "multi_image", "multi_study")


@pytest.fixture(scope="module")
def mistral_folder(tmp_path_factory) -> Path:
    """A Hugging Face tokenizer folder of Mistral-7B-Instruct-v0.2, as its hub repository holds."""
    from transformers import LlamaTokenizer

    raw = tmp_path_factory.mktemp("sentencepiece")
    shutil.copy(SENTENCEPIECE_MODEL, raw / "tokenizer.model")
    out = tmp_path_factory.mktemp("mistral-7b-instruct-v0.2")
    LlamaTokenizer.from_pretrained(raw).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok(mistral_folder):
    return load_tokenizer(str(mistral_folder))


def authors_text(turns: list[dict]) -> str:
    """Their Mistral template: <s>[INST] SYSTEM + " " + question [/INST]answer</s>[INST] ..."""
    text, first = "<s>", True
    for t in turns:
        if t["role"] == "user":
            text += "[INST] " + (SYSTEM + " " if first else "") + t["content"] + " [/INST]"
            first = False
        else:
            text += t["content"] + "</s>"
    return text


def sentencepiece_ids(text: str, tokens_per_image: int) -> tuple[list[int], list[int]]:
    """Their encoding of `text`: pieces split at <image>, [INST], [/INST], each encoded by
    SentencePiece (<s> and </s> as ids 1 and 2); the piece after [/INST] is the answer."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(SENTENCEPIECE_MODEL))
    ids, answer_ids = [], []
    pieces = [p for p in re.split(r"(<image>|\[INST\]|\[/INST\])", text) if p]
    for i, piece in enumerate(pieces):
        if piece == "<image>":
            ids += [32_000] * tokens_per_image
            continue
        if piece == "<s>":
            ids.append(1)
            continue
        body, eos = (piece[:-4], [2]) if piece.endswith("</s>") else (piece, [])
        encoded = sp.encode(body) + eos
        ids += encoded
        if pieces[i - 1] == "[/INST]":
            answer_ids += encoded
    return ids, answer_ids


def conversations(text_only: bool) -> dict[str, list[dict]]:
    """Every task (report generation with CoT and without) rendered from the test fields; text_only
    drops the image placeholders."""
    out = {task: render_conversation(task, FIELDS) for task in task_names()}
    out.update({f"{task}/no_cot": render_conversation(task, FIELDS, cot=False) for task in SCENARIOS})
    if text_only:
        for conv in out.values():
            for turn in conv:
                turn["content"] = " ".join(turn["content"].replace("<image>", " ").split())
    return out


def test_the_tokenizer_is_mistrals_with_one_image_token_added(tok):
    assert len(tok) == 32_001 and image_token_id(tok) == 32_000
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.convert_ids_to_tokens(28705) == "▁"  # a real SentencePiece piece, not a tiny BPE's


@pytest.mark.parametrize("task", sorted(AUTHORS))
def test_every_tasks_ids_are_the_authors_encoding_of_their_template(tok, task):
    turns = expected_turns(task)  # the authors' template text, filled by hand
    text = authors_text(turns)
    conv = render_conversation(task, FIELDS)
    ids, labels = encode_conversation(tok, conv, tokens_per_image=3)
    expected, answers = sentencepiece_ids(text, 3)
    assert ids == expected
    # the lone "▁" (28705) after [INST], after an image followed by a word, and before [/INST]
    inst = [i for i in range(len(ids) - 3) if ids[i:i + 3] == [733, 16289, 28793]]
    assert inst and all(ids[i + 3] == 28705 for i in inst)
    assert all(ids[i - 1] == 28705 for i in range(1, len(ids) - 3) if ids[i:i + 4] == [733, 28748, 16289, 28793])
    if text.count("<image>") == 1:
        assert ids[ids.index(32_000) + 3] == 28705
    # the loss covers exactly the answers, each with its </s>
    assert [i for i, y in zip(ids, labels) if y != IGNORE] == answers
    assert all(y in (IGNORE, i) for i, y in zip(ids, labels))
    # the generation prompt at each question: the conversation so far, ending in [/INST]
    for k, turn in enumerate(turns):
        if turn["role"] == "user":
            prompt, _ = encode_conversation(tok, conv[:k + 2], 3, for_generation=True)
            assert prompt == sentencepiece_ids(authors_text(turns[:k + 1]), 3)[0], (task, k)


@pytest.mark.parametrize("task", SCENARIOS)
def test_report_questions_without_cot_are_the_authors(tok, task):
    authors = {"single_image": "radiology image: <image> Provide a description of the findings in the radiology image.",
               "multi_image": "radiology images: <image> <image> Provide a description of the findings in the radiology images.",
               "multi_study": "prior radiology images: <image> <image> <image>, prior radiology report: Clear lungs. "
                              "follow-up images: <image> <image>, The radiology studies are given in chronological order. "
                              "Provide a description of the findings in the current follow-up radiology images."}[task]
    ids, _ = encode_conversation(tok, render_conversation(task, FIELDS, cot=False), tokens_per_image=3)
    text = authors_text([{"role": "user", "content": authors}, {"role": "assistant", "content": FIELDS["report"]}])
    assert ids == sentencepiece_ids(text, 3)[0]


def test_words_split_as_sentencepiece_splits_them_on_real_reports(tok):
    """3,080 real reports (IU X-ray, ../shared/data/real) and spaces in every position: the
    transformers tokenizer gives SentencePiece's ids."""
    import csv

    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(SENTENCEPIECE_MODEL))
    texts = [" The heart", "  two  spaces ", "a   b", "x\n  y", "\ttab", " ", "   ", "ünïcode – 😀 "]
    reports = Path(__file__).resolve().parents[2] / "shared/data/real/iu_reports_dev/reports_with_gold.csv"
    if reports.is_file():
        texts += [row["findings"] for row in csv.DictReader(reports.open())]
    differ = [t for t in texts if tok(t, add_special_tokens=False)["input_ids"] != sp.encode(t)]
    assert not differ, differ[:3]


@pytest.mark.parametrize("task", sorted(conversations(text_only=False)))
def test_image_placeholders_expand_without_moving_other_ids(tok, task):
    conv = conversations(text_only=False)[task]
    image = image_token_id(tok)
    one, one_labels = encode_conversation(tok, conv, tokens_per_image=1)
    full, full_labels = encode_conversation(tok, conv, tokens_per_image=361)
    n_images = sum(t["content"].count("<image>") for t in conv)
    assert one.count(image) == n_images and full.count(image) == 361 * n_images
    assert [i for i in full if i != image] == [i for i in one if i != image]
    assert [y for i, y in zip(full, full_labels) if i != image] == [y for i, y in zip(one, one_labels) if i != image]
    assert all(y == IGNORE for i, y in zip(full, full_labels) if i == image)
    runs = "".join("x" if i == image else "." for i in full).split(".")
    assert sorted(len(r) for r in runs if r) == [361] * n_images  # each image is one run of 361


@pytest.mark.slow
def test_a_tiny_mistral_trains_on_ray_and_generates_with_the_real_tokenizer(ray_local, synthetic_corpus,
                                                                          mistral_folder, tmp_path):
    """The quickstart's tiny Mistral-shaped LLM with the 32,000-piece tokenizer: its embedding gets
    one row more for <image>, a few Ray Train steps lower the loss, and the checkpoint generates."""
    from PIL import Image

    from m4cxr.config import load_experiment
    from m4cxr.model.checkpoint import load_checkpoint
    from m4cxr.train.lineage import read_metrics
    from m4cxr.train.run import run_stage

    from conftest import ROOT

    corpus, _ = synthetic_corpus
    exp = load_experiment(ROOT / "experiments/quickstart.yaml", [
        f"train.output_dir={tmp_path}", f"model.tokenizer={mistral_folder}", "train.instruction.training_steps=6",
        "train.instruction.max_steps=6", "train.instruction.global_batch_size=4", "train.micro_batch_size=2",
        "train.instruction.lr=3e-3", "train.checkpoint_every=6", "train.log_every=1", "train.val_samples=4"])
    summary = run_stage(exp, "instruction", corpus, run_name="real-tokenizer")
    losses = [r["loss"] for r in read_metrics(tmp_path / "real-tokenizer") if "loss" in r]
    assert summary["steps"] == 6 and len(losses) >= 6
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns

    model, _ = load_checkpoint(summary["checkpoint"])
    assert len(model.tokenizer) == 32_001 and model.llm.get_input_embeddings().num_embeddings == 32_001
    conv = [{"role": "system", "content": exp.data.system_prompt or "You are a radiologist."},
            {"role": "user", "content": "radiology image: <image> Answer the question. Is the heart enlarged?"}]
    details = model.generate_details([conv], [[Image.new("L", (112, 112), 90)]], max_new_tokens=6)[0]
    assert details["completion_tokens"] >= 1 and isinstance(details["text"], str)


def test_the_full_size_model_on_the_meta_device_takes_the_real_tokenizers_ids(tok):
    """Rad-DINO + C-Abstractor + Mistral-7B as the paper's experiment names them (their published
    configs, no weights): a 518 px image is 37 x 37 patches, pooled to 361 visual tokens, exactly
    the run of ids one <image> expands to; the tokenizer's 32,001 ids all embed, <image> (32,000,
    past Mistral's 32,000 rows) included, since its row is replaced by the image's tokens. The
    LLM keeps Mistral's own 32,000 rows, so the base weights load unchanged and its checkpoints
    stay LoRA adapters on that base."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Dinov2Config, Dinov2Model

    from m4cxr.config import load_experiment
    from m4cxr.model.m4cxr import M4CXR, add_lora
    from m4cxr.model.projector import CAbstractor
    from m4cxr.model.summary import KNOWN, published_architectures
    from m4cxr.model.vision import VisionEncoder

    from conftest import ROOT

    exp = load_experiment(ROOT / "experiments/m4cxr.yaml")
    arch, cfg = published_architectures(), exp.model
    with torch.device("meta"):
        vision = VisionEncoder(Dinov2Model(Dinov2Config(**arch[KNOWN[cfg.vision_encoder]])))
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model("mistral", **arch[KNOWN[cfg.llm]]))
        p = cfg.projector
        projector = CAbstractor(vision.num_tokens(exp.data.image_size), vision.hidden_size, llm.config.hidden_size,
                                p.hidden_size, p.depth, p.mlp_depth, p.num_query_tokens)
        model = M4CXR(vision, projector, add_lora(llm, cfg), tok, exp.data.image_size, cfg.image_mean,
                      cfg.image_std, exp.data.box_convention)
        conv = conversations(text_only=False)["single_image"][:2]
        ids, _ = encode_conversation(tok, conv, tokens_per_image=model.tokens_per_image)
        n_images = conv[1]["content"].count("<image>")
        visual = model.encode_images(torch.zeros(n_images, 3, 518, 518))
    assert exp.data.image_size == 518 and vision.num_tokens(518) == 37 * 37
    assert model.tokens_per_image == 361 and ids.count(image_token_id(tok)) == 361 * n_images
    assert visual.shape == (n_images, 361, 4096) and visual.device.type == "meta"
    # what M4CXR.embed looks up: every id but <image>'s, whose positions take `visual`
    looked_up = torch.tensor(ids).masked_fill(torch.tensor(ids) == image_token_id(tok), 0)
    assert int(looked_up.max()) < llm.get_input_embeddings().num_embeddings
    assert len(tok) == 32_001 and llm.get_input_embeddings().num_embeddings == 32_000
    assert llm.get_output_embeddings().out_features == 32_000  # <image> is never a target nor generated
