"""Tokenizer and chat format.

Real runs use the LLM's own tokenizer (Mistral's, whose chat format is
`<s>[INST] user [/INST] answer</s>[INST] ...`) plus an `<image>` placeholder token. Tiny runs
train a small BPE tokenizer on the corpus text with the tokenizers library and give it the same
Mistral-style chat template; it is saved with every checkpoint.

`encode_conversation` turns the rendered turns into token ids and labels: the loss covers the
assistant turns (and their end-of-sequence token) only, and each `<image>` becomes as many
image tokens as the projector outputs per image.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
IGNORE = -100

# Mistral's format; a system prompt goes before the first user message, as Mistral's own
# template does.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] + '\n\n' -%}"
    "{%- elif m['role'] == 'user' -%}{{- '[INST] ' + ns.system + m['content'] + ' [/INST]' -}}{%- set ns.system = '' -%}"
    "{%- else -%}{{- ' ' + m['content'] + eos_token -}}{%- endif -%}"
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


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub id or folder, with the `<image>` token and a pad token added."""
    tok = AutoTokenizer.from_pretrained(source)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    if not tok.chat_template:
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


def encode_conversation(tok: PreTrainedTokenizerBase, turns: Sequence[dict], tokens_per_image: int,
                        for_generation: bool = False) -> tuple[list[int], list[int]]:
    """Turns -> (input_ids, labels). Labels are IGNORE except on assistant tokens and their EOS.
    With for_generation, a trailing assistant turn is left off (the model writes it)."""
    turns = list(turns)
    if for_generation and turns and turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    img = image_token_id(tok)
    ids: list[int] = [tok.bos_token_id]
    labels: list[int] = [IGNORE]
    system = ""
    for turn in turns:
        role, content = turn["role"], turn["content"]
        if role == "system":
            system = content + "\n\n"
            continue
        if role == "user":
            piece = _encode(tok, "[INST] " + system + content + " [/INST]")
            system = ""
            expanded = []
            for t in piece:  # each <image> -> the projector's number of visual tokens
                expanded.extend([img] * tokens_per_image if t == img else [t])
            ids += expanded
            labels += [IGNORE] * len(expanded)
        elif role == "assistant":
            piece = _encode(tok, " " + content) + [tok.eos_token_id]
            if img in piece:
                raise ValueError("an assistant turn must not contain <image>")
            ids += piece
            labels += piece
        else:
            raise ValueError(f"unknown role {role!r} in a conversation")
    return ids, labels
