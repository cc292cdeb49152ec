"""M4CXR: vision encoder -> C-Abstractor -> LLM with LoRA, images interleaved with text.

Each `<image>` in a user turn is expanded at tokenisation time to the projector's number of
visual tokens (361 for the paper); `forward` embeds the text, then writes each image's projected
embeddings into its positions, in order, for any number of images per sample. The loss covers
assistant turns only (labels from tokenizer.encode_conversation). Generation left-pads the batch
so that batched answers equal one-by-one answers.
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from m4cxr.config import Experiment, ModelConfig
from m4cxr.model.inputs import collate
from m4cxr.model.projector import CAbstractor
from m4cxr.model.tokenizer import image_token_id
from m4cxr.model.vision import VisionEncoder, build_vision_encoder, pixel_values

PARTS = ("vision_encoder", "projector", "llm_lora", "llm")


# ----------------------------------------------------------------------------- building blocks


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention(requested: str, on_gpu: bool) -> str:
    """The attention implementation to ask transformers for, with a clear message when the
    experiment asks for flash-attention where it cannot run."""
    if requested == "flash_attention_2":
        if not flash_attn_available():
            raise ImportError(
                "model.attention=flash_attention_2 needs the flash-attn package, which is not installed. "
                "Install it on a CUDA machine with pip install -e '.[gpu]', or set model.attention=sdpa."
            )
        if not on_gpu:
            raise ValueError("model.attention=flash_attention_2 needs a CUDA GPU; set model.attention=sdpa on CPU")
        return requested
    if requested == "auto":
        return "flash_attention_2" if on_gpu and flash_attn_available() else "sdpa"
    return requested


def llm_architecture(cfg: ModelConfig, vocab_size: int | None = None):
    """The LLM's transformers config: from model.llm_config (random weights) or the hub id / folder."""
    if cfg.llm_config:
        fields = dict(cfg.llm_config)
        model_type = fields.pop("model_type", "mistral")
        if vocab_size is not None:  # the tokenizer's size, unless the config names one
            if fields.get("vocab_size", vocab_size) < vocab_size:
                raise ValueError(f"model.llm_config.vocab_size {fields['vocab_size']} is smaller than the "
                                 f"tokenizer's {vocab_size} tokens")
            fields.setdefault("vocab_size", vocab_size)
        return AutoConfig.for_model(model_type, **fields)
    return AutoConfig.from_pretrained(cfg.llm)


def build_llm(cfg: ModelConfig, attention: str, vocab_size: int | None = None, dtype=None) -> PreTrainedModel:
    if cfg.llm_config:
        arch = llm_architecture(cfg, vocab_size)
        return AutoModelForCausalLM.from_config(arch, attn_implementation=attention, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(cfg.llm, attn_implementation=attention, dtype=dtype)


def add_lora(llm: PreTrainedModel, cfg: ModelConfig):
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(llm, lora)


# ----------------------------------------------------------------------------- the model


class M4CXR(nn.Module):
    def __init__(self, vision: VisionEncoder, projector: CAbstractor, llm: nn.Module,
                 tokenizer: PreTrainedTokenizerBase, image_size: int, image_mean: Sequence[float],
                 image_std: Sequence[float], box_convention: str = "resize"):
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.tokenizer = tokenizer
        # the meta-device build of the parameter summary has no tokenizer
        self.image_token_id = image_token_id(tokenizer) if tokenizer is not None else None
        self.tokens_per_image = projector.num_query_tokens
        self.image_size = image_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.box_convention = box_convention

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    # -- parts and stages

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part: vision_encoder, projector, llm_lora (adapters), llm (the base LLM)."""
        lora, base = [], []
        for name, p in self.llm.named_parameters():
            (lora if "lora_" in name else base).append(p)
        return {"vision_encoder": list(self.vision.parameters()), "projector": list(self.projector.parameters()),
                "llm_lora": lora, "llm": base}

    def set_trainable(self, trainable: Sequence[str]) -> dict[str, int]:
        """Train exactly the named parts (a stage's `trainable`); returns trainable counts per part."""
        unknown = [t for t in trainable if t not in PARTS]
        if unknown:
            raise ValueError(f"unknown trainable part(s) {unknown}; the parts are {list(PARTS)}")
        for name, params in self.parts().items():
            for p in params:
                p.requires_grad_(name in trainable)
        return self.trainable_counts()

    def trainable_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in params if p.requires_grad) for name, params in self.parts().items()}

    # -- forward

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) -> (images, tokens_per_image, llm hidden)."""
        return self.projector(self.vision(pixels))

    def embed(self, input_ids: torch.Tensor, pixels: torch.Tensor | None) -> torch.Tensor:
        is_image = input_ids == self.image_token_id
        # the image token may lie outside the LLM's vocabulary (added to a real tokenizer): its
        # embedding is replaced anyway, so look up a valid id there
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        n_image_tokens = int(is_image.sum())
        if pixels is None or len(pixels) == 0:
            if n_image_tokens:
                raise ValueError(f"the batch has {n_image_tokens} image tokens but no images")
            return embeds
        visual = self.encode_images(pixels.to(self.device, self.vision.model.dtype))
        if n_image_tokens != visual.shape[0] * visual.shape[1]:
            raise ValueError(
                f"the batch has {n_image_tokens} image tokens but {visual.shape[0]} images x "
                f"{visual.shape[1]} tokens: each <image> must match one image")
        # masked_scatter fills positions in row-major order: sample by sample, left to right,
        # which is the order of the images in `pixels`
        return embeds.masked_scatter(is_image.unsqueeze(-1), visual.to(embeds.dtype).reshape(-1, embeds.shape[-1]))

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None, position_ids=None):
        """Padded rows (attention_mask), or packed rows (position_ids restarting at 0 for each
        sample and for a row's padding; no attention_mask): each packed sample attends only to
        itself, with the positions it has alone."""
        embeds = self.embed(input_ids, pixel_values)
        if position_ids is None:
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)
        if attention_mask is not None:
            # transformers derives the per-sample causal mask from position_ids only without one
            raise ValueError("packed rows take position_ids and no attention_mask")
        position_ids = position_ids.to(embeds.device)
        # no cache either: with one (transformers makes one unless told not to, also in training)
        # the mask ignores the restarts and every sample would see the ones before it in its row
        return self.llm(inputs_embeds=embeds, position_ids=position_ids, labels=labels, use_cache=False,
                        **packed_attention_kwargs(position_ids))

    # -- data

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return pixel_values(images, self.image_size, self.image_mean, self.image_std, self.box_convention)

    def collate(self, conversations: Sequence[Sequence[dict]], images: Sequence[Sequence[Image.Image]],
                for_generation: bool = False) -> dict[str, torch.Tensor]:
        """Tokenise, expand images, pad (left for generation, right for training): model/inputs.py."""
        return collate(self.tokenizer, conversations, images, self.tokens_per_image, self.image_size,
                       self.image_mean, self.image_std, self.box_convention, for_generation)

    @torch.no_grad()
    def embed_prompts(self, conversations: Sequence[Sequence[dict]],
                      images: Sequence[Sequence[Image.Image]]) -> list[torch.Tensor]:
        """The generation prompts of the conversations as LLM input embeddings, one (positions,
        hidden) tensor each without padding, images spliced in: what an engine that runs the LLM
        on prompt embeddings takes. The images of all of them go through the encoder at once."""
        batch = self.collate(conversations, images, for_generation=True)
        embeds = self.embed(batch["input_ids"].to(self.device), batch["pixel_values"])
        lengths = batch["attention_mask"].sum(1).tolist()
        return [row[row.shape[0] - n:] for row, n in zip(embeds, lengths)]  # left padding cut off

    # -- generation

    @torch.no_grad()
    def generate(self, conversations: Sequence[Sequence[dict]], images: Sequence[Sequence[Image.Image]],
                 max_new_tokens: int = 500, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None) -> list[str]:
        """The assistant's next answer for each conversation (a trailing assistant turn is dropped).
        Greedy by default; sampling when do_sample. Stops at EOS or max_new_tokens."""
        return [d["text"] for d in self.generate_details(conversations, images, max_new_tokens, do_sample,
                                                         temperature, top_p, seed)]

    @torch.no_grad()
    def generate_details(self, conversations: Sequence[Sequence[dict]], images: Sequence[Sequence[Image.Image]],
                         max_new_tokens: int = 500, do_sample: bool = False, temperature: float = 1.0,
                         top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
                         streamer=None) -> list[dict]:
        """generate(), with what an API reports of each answer: {"text", "prompt_tokens" (images
        counted as their tokens), "completion_tokens", "finish_reason": "stop" (EOS or a stop
        string, which is cut off) | "length"}. A transformers streamer gets the text as it comes."""
        batch = self.collate(conversations, images, for_generation=True)
        device = self.device
        embeds = self.embed(batch["input_ids"].to(device), batch["pixel_values"])
        if seed is not None:
            torch.manual_seed(seed)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
        if stop:
            sampling.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        out = self.llm.generate(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(device), max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id, streamer=streamer,
            **sampling,
        )
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        details = []
        for row, prompt in zip(out.tolist(), batch["attention_mask"].sum(1).tolist()):
            ended = eos in row
            tokens = row[:row.index(eos) + 1] if ended else row
            while not ended and tokens and tokens[-1] == pad:  # a row a stop string ended is padded after it
                tokens = tokens[:-1]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
            details.append({"text": text.strip(), "prompt_tokens": int(prompt), "completion_tokens": len(tokens),
                            "finish_reason": "stop" if ended or cut >= 0 else "length"})
        return details


def packed_attention_kwargs(position_ids: torch.Tensor) -> dict:
    """flash-attention's variable-length arguments for packed rows: the rows laid end to end, a
    sequence starting at every position 0. sdpa and eager ignore them: transformers builds the
    same block-diagonal causal mask from position_ids when there is no attention mask."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def build_model(exp: Experiment, tokenizer: PreTrainedTokenizerBase | None, on_gpu: bool = False, dtype=None,
                vision: VisionEncoder | None = None, llm: nn.Module | None = None, projector: dict | None = None,
                image: dict | None = None) -> M4CXR:
    """The one way the model is put together: for training (everything from the experiment:
    encoder and LLM loaded or built from their configs with random weights, a fresh C-Abstractor,
    LoRA added), for a checkpoint (its encoder, its LLM with its adapter, its projector settings
    and image settings given) and for the parameter summary (parts built on the meta device).
    A given `llm` is used as it is: LoRA is added only to an LLM built here."""
    cfg = exp.model
    vision = vision or build_vision_encoder(cfg.vision_encoder, cfg.vision_config, exp.data.image_size)
    if llm is None:
        attention = resolve_attention(cfg.attention, on_gpu)
        vocab = len(tokenizer) if cfg.llm_config and tokenizer is not None else None
        llm = add_lora(build_llm(cfg, attention, vocab_size=vocab, dtype=dtype), cfg)
    projector = projector or dict(
        num_input_tokens=vision.num_tokens(exp.data.image_size), encoder_dim=vision.hidden_size,
        llm_dim=llm.get_input_embeddings().embedding_dim, hidden_size=cfg.projector.hidden_size,
        depth=cfg.projector.depth, mlp_depth=cfg.projector.mlp_depth, num_query_tokens=cfg.projector.num_query_tokens)
    image = image or dict(image_size=exp.data.image_size, image_mean=cfg.image_mean, image_std=cfg.image_std,
                          box_convention=exp.data.box_convention)
    return M4CXR(vision, CAbstractor(**projector), llm, tokenizer, **image)


def describe_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items())
