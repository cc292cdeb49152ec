"""Training-step speed of the full-size M4CXR (Rad-DINO + C-Abstractor + Mistral-7B, LoRA) on one GPU.

Random weights from the published architecture numbers (no download), bf16, flash-attention 2
when flash-attn is installed and sdpa otherwise. Times stage-2 steps (encoder, projector and
LoRA trainable) at the paper's sequence lengths: 1, 2, 5 and 10 images of 361 visual tokens plus
text, and prints tokens/s and MFU. With --packing, a micro-batch is --batch packed rows of up to
--row-tokens tokens (data.packing), each holding as many samples of the shape as fit, each
sample attending only to itself. Also checks that batched greedy generation equals one-by-one
generation in bf16. Writes a JSON result with --out.

    python benchmarks/gpu_step.py --out benchmarks/gpu_step.json          # on a GPU machine
    python benchmarks/gpu_step.py --packing --batch 1,2 --out benchmarks/gpu_step_packed.json
    python benchmarks/gpu_step.py --tiny                                   # a CPU smoke run
    python benchmarks/gpu_step.py --tiny --packing --images 1,2 --batch 1

Needs torch, transformers, peft (not Ray). Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import torch  # noqa: E402

import numpy as np  # noqa: E402

from m4cxr.config import experiment_from_dict  # noqa: E402
from m4cxr.data.pipeline import packed_batch  # noqa: E402
from m4cxr.model.m4cxr import build_model, flash_attn_available  # noqa: E402
from m4cxr.model.summary import published_architectures  # noqa: E402
from m4cxr.model.tokenizer import train_tiny_tokenizer  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


def experiment(tiny: bool) -> dict:
    arch = published_architectures()
    vision = dict(arch["rad_dino"])
    llm = {"model_type": "mistral", **arch["mistral_7b_instruct_v0_2"]}
    projector = {"depth": 3, "mlp_depth": 2, "hidden_size": 1024, "num_query_tokens": 361}
    image_size = 518
    if tiny:
        vision.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=2)
        llm.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)
        projector = {"depth": 1, "mlp_depth": 2, "hidden_size": 64, "num_query_tokens": 16}
        image_size = 112
    vision.pop("image_size", None)
    return {"name": "gpu-step", "data": {"image_size": image_size},
            "model": {"vision_config": vision, "llm_config": llm, "projector": projector, "attention": "auto",
                      "lora": {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for a CPU smoke run")
    parser.add_argument("--images", default="1,2,5,10")
    parser.add_argument("--batch", default="1,4", help="micro-batch sizes (the larger ones up to 4 images)")
    parser.add_argument("--text-tokens", type=int, default=300, help="text tokens per sample besides images")
    parser.add_argument("--packing", action="store_true", help="packed rows (data.packing) instead of one sample a row")
    parser.add_argument("--row-tokens", type=int, help="the length of a packed row (with --packing; 4,096 then)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.row_tokens is not None and not args.packing:
        parser.error("--row-tokens sets the length of a packed row: give --packing with it")
    args.row_tokens = args.row_tokens or 4096

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    exp = experiment_from_dict(experiment(args.tiny))
    tok = train_tiny_tokenizer(["radiology image <image> findings report"] * 10, 200)
    started = time.time()
    with torch.device(device):
        model = build_model(exp, tok, on_gpu=on_gpu, dtype=torch.bfloat16 if on_gpu else None)
    model.to(device)
    if on_gpu:
        model.vision.to(torch.bfloat16)
        model.projector.to(torch.bfloat16)
    counts = model.set_trainable(["vision_encoder", "projector", "llm_lora"])
    attention = model.llm.config._attn_implementation
    build_s = time.time() - started
    print(f"built in {build_s:.1f}s on {device}; attention {attention}; trainable {counts}", flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=on_gpu)
    n_llm = sum(p.numel() for p in model.llm.parameters())
    n_vision = sum(p.numel() for p in model.vision.parameters())
    n_proj = sum(p.numel() for p in model.projector.parameters())
    cfg = model.llm.config
    per_image = model.tokens_per_image
    enc_tokens = model.vision.num_tokens(model.image_size)
    gpu_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu_name), None)

    results = []
    shapes = [(n, b) for n in (int(x) for x in args.images.split(",")) for b in (int(x) for x in args.batch.split(","))
              if b == 1 or n * b <= 8 or args.packing]
    for n_images, bsz in shapes:
        seq = n_images * per_image + args.text_tokens
        # packed: `bsz` rows of as many samples as fit in --row-tokens; otherwise one sample a row
        per_row = max(1, args.row_tokens // seq) if args.packing else 1
        ids = torch.randint(10, cfg.vocab_size - 1, (bsz * per_row, seq))
        ids[:, 5:5 + n_images * per_image] = model.image_token_id
        labels = ids.clone()
        labels[:, : seq - args.text_tokens // 2] = -100  # loss on the answer part
        pixels = torch.randn(bsz * per_row * n_images, 3, model.image_size, model.image_size, device=device)
        if args.packing:
            samples = [(ids[i].numpy().astype(np.int32), labels[i].numpy().astype(np.int32)) for i in range(len(ids))]
            packed = packed_batch([samples[r * per_row:(r + 1) * per_row] for r in range(bsz)], tok.pad_token_id)
            batch = {"input_ids": packed["input_ids"].to(device), "position_ids": packed["position_ids"].to(device),
                     "labels": packed["labels"].to(device), "pixel_values": pixels}
        else:
            batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device),
                     "labels": labels.to(device), "pixel_values": pixels}
        try:
            for i in range(args.warmup + args.steps):
                if i == args.warmup:
                    if on_gpu:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    t0 = time.time()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
                    loss = model(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if on_gpu:
                torch.cuda.synchronize()
            step_s = (time.time() - t0) / args.steps
        except torch.OutOfMemoryError as err:
            results.append({"images": n_images, "batch": bsz, "seq_len": seq, "packed_per_row": per_row,
                            "error": f"out of memory: {str(err)[:120]}"})
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            print(f"{n_images} image(s), {seq} tokens: out of memory", flush=True)
            continue
        # FLOPs: the frozen LLM needs forward (2N) and activation gradients (2N) per token plus
        # LoRA's small weight gradients; attention 4 * layers * seq * hidden per token forward,
        # doubled for backward; encoder and projector train fully (6N per token / per image).
        # (packed rows: each sample's own attention only, the useful work)
        attn = 4 * cfg.num_hidden_layers * seq * cfg.hidden_size * 3
        samples = bsz * per_row
        flops = samples * (seq * (4 * n_llm + attn) + n_images * (6 * n_vision * enc_tokens + 6 * n_proj * per_image))
        row = {"images": n_images, "batch": bsz, "seq_len": seq, "packed_per_row": per_row,
               "row_len": int(batch["input_ids"].shape[1]), "step_s": round(step_s, 4),
               "tokens_per_s": round(samples * seq / step_s, 1), "samples_per_s": round(samples / step_s, 2),
               "tflops": round(flops / step_s / 1e12, 1),
               "mfu": round(flops / step_s / peak, 3) if peak else None,
               "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if on_gpu else None}
        results.append(row)
        print(json.dumps(row), flush=True)

    # batched greedy generation must equal one-by-one generation (left padding), also in bf16
    model.eval()
    from PIL import Image

    img = Image.new("L", (model.image_size, model.image_size), 128)
    convs = [[{"role": "user", "content": "<image> findings"}],
             [{"role": "user", "content": "<image> <image> report findings radiology image report"}]]
    images = [[img], [img, img]]

    def greedy_ids(cs, ims):  # token ids, not text: random weights write ids the tiny tokenizer lacks
        b = model.collate(cs, ims, for_generation=True)
        embeds = model.embed(b["input_ids"].to(device), b["pixel_values"])
        return model.llm.generate(inputs_embeds=embeds, attention_mask=b["attention_mask"].to(device),
                                  max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                                  eos_token_id=None).tolist()

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
        batched = greedy_ids(convs, images)
        single = [greedy_ids([c], [i])[0] for c, i in zip(convs, images)]
    check = {"batched_equals_single": batched == single, "batched": batched, "single": single}
    print(json.dumps(check), flush=True)

    out = {"device": gpu_name, "torch": torch.__version__, "attention": attention,
           "flash_attn_installed": flash_attn_available(), "dtype": "bf16" if on_gpu else "fp32",
           "params": {"llm": n_llm, "vision": n_vision, "projector": n_proj}, "trainable": counts,
           "build_s": round(build_s, 1), "steps": results, "generation_check": check, "tiny": args.tiny,
           "packing": args.packing, "row_tokens": args.row_tokens if args.packing else None,
           "date": time.strftime("%Y-%m-%d")}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "steps"}, indent=1))


if __name__ == "__main__":
    main()
