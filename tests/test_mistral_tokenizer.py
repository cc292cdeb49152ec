"""The real tokenizer of Mistral-7B-Instruct-v0.2, built from the SentencePiece model that
mistral-common ships (tokenizer.model.v1, 32,000 pieces): our chat encoding equals
mistral-common's reference encoding, the loss covers exactly the assistant turns, and `<image>`
expands to the visual tokens without moving any other id."""

import shutil
from pathlib import Path

import pytest

from m4cxr.data.templates import cot_candidates, render_conversation
from m4cxr.model.tokenizer import IGNORE, encode_conversation, image_token_id, load_tokenizer

mistral_common = pytest.importorskip("mistral_common")

SCENARIOS = ("single_image", "multi_image", "multi_study")


@pytest.fixture(scope="module")
def mistral_folder(tmp_path_factory) -> Path:
    """A Hugging Face tokenizer folder of Mistral-7B-Instruct-v0.2, as its hub repository holds."""
    from transformers import LlamaTokenizer

    raw = tmp_path_factory.mktemp("sentencepiece")
    shutil.copy(Path(mistral_common.__file__).parent / "data/tokenizer.model.v1", raw / "tokenizer.model")
    out = tmp_path_factory.mktemp("mistral-7b-instruct-v0.2")
    LlamaTokenizer.from_pretrained(raw).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok(mistral_folder):
    return load_tokenizer(str(mistral_folder))


def reference_ids(conversation: list[dict]) -> list[int]:
    """mistral-common's encoding of a conversation: a trailing user turn is the generation prompt
    (its serving mode), a trailing answer a training sample (its fine-tuning mode)."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    messages = [kinds[t["role"]](content=t["content"]) for t in conversation]
    mode = ValidationMode.finetuning if conversation[-1]["role"] == "assistant" else ValidationMode.test
    reference = MistralTokenizer.from_file(str(Path(mistral_common.__file__).parent / "data/tokenizer.model.v1"),
                                           mode=mode)
    return reference.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


def conversations(text_only: bool) -> dict[str, list[dict]]:
    """Every report-generation scenario (CoT: findings, then the report) and a VQA turn, as the
    templates render them; text_only drops the image placeholders."""
    fields = {"images": 2, "findings": cot_candidates(), "positives": ["Cardiomegaly", "Pleural Effusion"],
              "report": "The heart is enlarged. There is a small left pleural effusion.", "prior_images": 1,
              "prior_report": "No acute cardiopulmonary process.", "follow_up_images": 2,
              "question": "Is there a pneumothorax?", "answer": "no"}
    out = {task: render_conversation(task, fields) for task in SCENARIOS + ("vqa",)}
    if text_only:
        for conv in out.values():
            for turn in conv:
                turn["content"] = " ".join(turn["content"].replace("<image>", " ").split())
    return out


def test_the_tokenizer_is_mistrals_with_one_image_token_added(tok):
    assert len(tok) == 32_001 and image_token_id(tok) == 32_000
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.convert_ids_to_tokens(28705) == "▁"  # a real SentencePiece piece, not a tiny BPE's


@pytest.mark.parametrize("task", SCENARIOS + ("vqa",))
def test_encoding_equals_mistral_commons_for_every_scenario(tok, task):
    conv = conversations(text_only=True)[task]
    ids, labels = encode_conversation(tok, conv, tokens_per_image=361)
    # the whole conversation: mistral-common ends a finished conversation with the last answer's </s>
    assert ids == reference_ids(conv)
    # the generation prompt at each user turn: the conversation so far, ending in [/INST]
    for end in range(2, len(conv) + 1, 2):
        prompt, _ = encode_conversation(tok, conv[:end], 361, for_generation=True)
        assert prompt == reference_ids(conv[:end]), (task, end)
    # the loss covers exactly the assistant turns, each with its </s>
    answers = [t["content"] for t in conv if t["role"] == "assistant"]
    expected = [i for a in answers for i in tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert [i for i, y in zip(ids, labels) if y != IGNORE] == expected
    assert all(y in (IGNORE, i) for i, y in zip(ids, labels))


@pytest.mark.parametrize("task", SCENARIOS + ("vqa",))
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
