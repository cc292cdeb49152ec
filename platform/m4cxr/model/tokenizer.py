"""Tokenizer and the authors' chat format.

Real runs use the LLM's own tokenizer (Mistral's) plus an `<image>` placeholder token. Tiny runs
train a small BPE tokenizer on the corpus text with the tokenizers library; it is saved with
every checkpoint.

The prompt format is the authors' (deepnoid-ai/M4CXR-TNNLS): the text

    <s>[INST] {system} {user} [/INST]{answer}</s>[INST] {user} [/INST]{answer}</s>...

is split at `<image>`, `[INST]` and `[/INST]` and each piece is encoded on its own, as their
tokenizer does. With Mistral's SentencePiece vocabulary every piece gets SentencePiece's
leading "▁", so a lone "▁" (id 28705) follows `[INST]` and each image and precedes `[/INST]`;
`load_tokenizer` makes a transformers tokenizer split words exactly as SentencePiece does
(tests/test_mistral_tokenizer.py holds every task's ids to SentencePiece itself). The loss
covers the piece after each `[/INST]` (the answer and its `</s>`); each `<image>` becomes as
many image tokens as the projector outputs per image.
"""

from __future__ import annotations

import json
import re
from typing import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
IGNORE = -100
USER, ASSISTANT = "[INST]", "[/INST]"
CHUNKS = re.compile(r"(<image>|\[INST\]|\[/INST\])")

# The authors' Mistral template, the system message joined to the first question by one space.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] + ' ' if m['content'] else '' -%}"
    "{%- elif m['role'] == 'user' -%}{{- '[INST] ' + ns.system + m['content'] + ' [/INST]' -}}{%- set ns.system = '' -%}"
    "{%- else -%}{{- m['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on `texts`, with Mistral-style special tokens and chat template.
    Digits are split one by one so box coordinates tokenise regularly."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN, "[INST]", "[/INST]"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=[IMAGE_TOKEN, "[INST]", "[/INST]"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def split_like_sentencepiece(tok: PreTrainedTokenizerBase) -> None:
    """A tokenizer converted from a SentencePiece model (byte-fallback BPE, Mistral's and
    Llama's) encodes as SentencePiece itself: a "▁" prefixed to the text, spaces as "▁", and
    words split where SentencePiece splits them (a run of spaces before a word is a piece of its
    own but for the last space, which starts the word). transformers' own conversion puts a
    leading space into the first word instead ("▁The" for " The", where SentencePiece and the
    authors' tokenizer give "▁", "▁The")."""
    backend = tok.backend_tokenizer
    if not json.loads(backend.to_str())["model"].get("byte_fallback"):
        return  # not a SentencePiece vocabulary (e.g. the tiny BPE): left as it is
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("▁[^▁]+|▁+(?=▁[^▁])|▁+"), behavior="isolated")


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub id or folder, with the `<image>` token and a pad token added,
    splitting words as SentencePiece does where its vocabulary is SentencePiece's."""
    tok = AutoTokenizer.from_pretrained(source)
    split_like_sentencepiece(tok)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    tok.chat_template = CHAT_TEMPLATE
    return tok


def corpus_texts(turn_lists: Iterable[Sequence[dict]]) -> Iterable[str]:
    for turns in turn_lists:
        for t in turns:
            yield t["content"]


def image_token_id(tok: PreTrainedTokenizerBase) -> int:
    return tok.convert_tokens_to_ids(IMAGE_TOKEN)


_CACHE_LIMIT = 100_000


def _encode(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    # questions, candidate lists and the system prompt repeat across samples: encode them once
    # (the cache lives on the tokenizer, so it can never serve another tokenizer's ids)
    cache = tok.__dict__.setdefault("_m4cxr_encode_cache", {})
    ids = cache.get(text)
    if ids is None:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(cache) < _CACHE_LIMIT:
            cache[text] = ids
    return ids


def chat_text(tok: PreTrainedTokenizerBase, turns: Sequence[dict]) -> str:
    """The authors' text of a conversation: the system message goes before the first question,
    joined by one space; an answer follows `[/INST]` directly and ends with `</s>`."""
    text, system = tok.bos_token, ""
    for turn in turns:
        role, content = turn["role"], turn["content"]
        if role == "system":
            system = content + " " if content else ""
        elif role == "user":
            text += f"{USER} {system}{content} {ASSISTANT}"
            system = ""
        elif role == "assistant":
            if IMAGE_TOKEN in content:
                raise ValueError("an assistant turn must not contain <image>")
            text += content + tok.eos_token
        else:
            raise ValueError(f"unknown role {role!r} in a conversation")
    return text


def encode_conversation(tok: PreTrainedTokenizerBase, turns: Sequence[dict], tokens_per_image: int,
                        for_generation: bool = False) -> tuple[list[int], list[int]]:
    """Turns -> (input_ids, labels), encoded piece by piece as the authors' tokenizer does.
    Labels are IGNORE except on each answer and its `</s>`. With for_generation, a trailing
    assistant turn is left off (the model writes it): the ids end with `[/INST]`."""
    turns = list(turns)
    if for_generation and turns and turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    img = image_token_id(tok)
    ids: list[int] = []
    labels: list[int] = []
    chunks = [c for c in CHUNKS.split(chat_text(tok, turns)) if c]
    for i, chunk in enumerate(chunks):
        if chunk == IMAGE_TOKEN:  # each <image> -> the projector's number of visual tokens
            ids += [img] * tokens_per_image
            labels += [IGNORE] * tokens_per_image
            continue
        piece = _encode(tok, chunk)
        ids += piece
        answer = i > 0 and chunks[i - 1] == ASSISTANT
        labels += piece if answer else [IGNORE] * len(piece)
    return ids, labels
