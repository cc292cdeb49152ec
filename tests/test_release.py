"""The authors' published M4CXR runs here: a tiny release written by this test in their layout
(stage 1: a model folder with vision_model.* under transformers-4 Dinov2 names, abstractor.*
under timm's names and language_model.*, their config.json and Mistral's tokenizer; stage 2: a
PEFT adapter with LoRA on q_proj/v_proj and the vision encoder and projector in
modules_to_save) is imported with `m4cxr model import`; its logits equal a reference forward
written out below; the key map covers the full-size release on the meta device; it is served on
both engines with the same greedy answers, evaluated, and fine-tuned."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.nn import functional as F

from conftest import ROOT, free_port
from test_mistral_tokenizer import SENTENCEPIECE_MODEL, authors_text, sentencepiece_ids
from test_templates import FIELDS, expected_turns

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=56)
LLM = dict(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
PROJECTOR = dict(depth=2, mlp_depth=2, hidden_size=48, num_query_tokens=4)
R, ALPHA = 8, 32
# transformers-4 names of Dinov2's attention (the release's), from transformers 5's
V4_NAMES = (("attention.q_proj.", "attention.attention.query."), ("attention.k_proj.", "attention.attention.key."),
            ("attention.v_proj.", "attention.attention.value."), ("attention.o_proj.", "attention.output.dense."))


def v4(name: str) -> str:
    for new, old in V4_NAMES:
        name = name.replace(new, old)
    return name


def timm_c_abstractor_shapes(depth, encoder_dim, hidden, llm_dim, tokens) -> dict[str, tuple]:
    """Honeybee's C-Abstractor as timm names it: net.0 and net.2 RegStages of blocks b1..bN
    (convN.conv + convN.bn, se.fc1/fc2, downsample where the channels change), readout.0/.2."""
    shapes = {"pos_emb": (1, tokens, encoder_dim)}
    for stage, first in (("net.0", encoder_dim), ("net.2", hidden)):
        for b in range(1, depth + 1):
            cin, p = (first if b == 1 else hidden), f"{stage}.b{b}."
            rd = round(cin * 0.25)
            shapes.update({p + "conv1.conv.weight": (hidden, cin, 1, 1), p + "conv2.conv.weight": (hidden, 1, 3, 3),
                           p + "conv3.conv.weight": (hidden, hidden, 1, 1), p + "se.fc1.weight": (rd, hidden, 1, 1),
                           p + "se.fc1.bias": (rd,), p + "se.fc2.weight": (hidden, rd, 1, 1), p + "se.fc2.bias": (hidden,)})
            for norm in ("conv1", "conv2", "conv3") + (("downsample",) if cin != hidden else ()):
                shapes.update({p + f"{norm}.bn.weight": (hidden,), p + f"{norm}.bn.bias": (hidden,)})
            if cin != hidden:
                shapes[p + "downsample.conv.weight"] = (hidden, cin, 1, 1)
    shapes.update({"readout.0.weight": (llm_dim, hidden), "readout.0.bias": (llm_dim,),
                   "readout.2.weight": (llm_dim, llm_dim), "readout.2.bias": (llm_dim,)})
    return shapes


def their_lora_shapes(layers: int, hidden: int, kv_dim: int) -> dict[str, tuple]:
    out = {}
    for i in range(layers):
        for proj, width in (("q_proj", hidden), ("v_proj", kv_dim)):
            p = f"base_model.model.language_model.model.layers.{i}.self_attn.{proj}."
            out.update({p + "lora_A.weight": (R, hidden), p + "lora_B.weight": (width, R)})
    return out


def random_tensors(shapes: dict[str, tuple], seed: int, scale: float = 0.2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen) * scale
        out[name] = t + 1.0 if name.endswith("bn.weight") else t
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_release(tmp_path_factory.mktemp("release"))


def write_tiny_release(root: Path) -> dict:
    """Folders as the authors' training writes them, and the configs a user downloads beside them."""
    from transformers import Dinov2Config, Dinov2Model, LlamaTokenizer, MistralConfig, MistralForCausalLM

    rad_dino, mistral = root / "rad-dino", root / "mistral"
    Dinov2Config(**VISION).save_pretrained(rad_dino)
    (rad_dino / "preprocessor_config.json").write_text(json.dumps({  # Rad-DINO's processor, at 56 px
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 56},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 56, "width": 56}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5307] * 3, "image_std": [0.2583] * 3}))
    MistralConfig(**LLM).save_pretrained(mistral)

    torch.manual_seed(0)
    vision = {f"vision_model.{v4(n)}": t for n, t in Dinov2Model(Dinov2Config(**VISION)).state_dict().items()}
    llm = {f"language_model.{n}": t for n, t in MistralForCausalLM(MistralConfig(**LLM)).state_dict().items()}
    projector_shapes = timm_c_abstractor_shapes(PROJECTOR["depth"], 32, PROJECTOR["hidden_size"], 128, 16)
    projector = {f"abstractor.{n}": t for n, t in random_tensors(projector_shapes, 1).items()}
    stage1 = root / "abstractor_pretraining" / "checkpoint-2000"
    stage1.mkdir(parents=True)
    save_file({**vision, **projector, **llm}, stage1 / "model.safetensors", metadata={"format": "pt"})
    (stage1 / "config.json").write_text(json.dumps({
        "architectures": ["MllmForConditionalGeneration"],
        "vision_config": {"encoder_type": "dinov2", "pretrained_vision_name_or_path": str(rad_dino)},
        "projector_config": {"projector_type": "c-abs", "num_eos_tokens": 0, "pos_emb": True, "prenorm": False,
                             "feature_layer_index": -1, **PROJECTOR},
        "lm_config": {"pretrained_lm_name_or_path": str(mistral), "pretrained_tokenizer_name_or_path": str(mistral)}}))
    raw = root / "sentencepiece"
    raw.mkdir()
    (raw / "tokenizer.model").write_bytes(SENTENCEPIECE_MODEL.read_bytes())
    LlamaTokenizer.from_pretrained(raw).save_pretrained(stage1)
    (stage1 / "optimizer.pt").write_bytes(b"not a weight file")  # a Trainer checkpoint folder holds these too
    torch.save({"lr": 1e-4}, stage1 / "training_args.bin")

    stage2 = root / "instruction_tuning" / "checkpoint-40000"
    stage2.mkdir(parents=True)
    torch.manual_seed(2)
    vision2 = {f"base_model.model.vision_model.{v4(n)}": t
               for n, t in Dinov2Model(Dinov2Config(**VISION)).state_dict().items()}
    projector2 = {f"base_model.model.abstractor.{n}": t for n, t in random_tensors(projector_shapes, 3).items()}
    lora = random_tensors(their_lora_shapes(2, 128, 64), 4, scale=0.3)
    save_file({**vision2, **projector2, **lora}, stage2 / "adapter_model.safetensors", metadata={"format": "pt"})
    (stage2 / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": None, "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.05,
        "target_modules": ".*language_model.*\\.(q_proj|v_proj)", "modules_to_save": ["vision_model", "abstractor"],
        "base_model_name_or_path": None, "inference_mode": True, "bias": "none"}))
    return {"root": root, "stage1": stage1, "stage2": stage2, "rad_dino": rad_dino, "mistral": mistral,
            "tensors": {"vision": vision2, "projector": projector2, "llm": llm, "lora": lora}}


@pytest.fixture(scope="module")
def imported(release):
    """`m4cxr model import` of the two folders, as a user runs it."""
    out = release["root"] / "imported"
    done = subprocess.run([sys.executable, "-m", "m4cxr.cli", "model", "import", "--base", str(release["stage1"]),
                           "--adapter", str(release["stage2"]), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "every one mapped and checked" in done.stdout and "r 8, alpha 32 on q_proj, v_proj" in done.stdout
    return out


def reference_logits(tensors: dict, pixels: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Their model's forward written out: Dinov2's last layer before its final layernorm without
    CLS, the C-Abstractor from the timm-named tensors, Mistral with the LoRA merged by hand
    (W + B A alpha / r), the image's tokens spliced in at id 32000's positions."""
    from transformers import Dinov2Config, Dinov2Model, MistralConfig, MistralForCausalLM

    def strip(prefix: str, part: dict) -> dict:
        return {n.removeprefix(prefix): t for n, t in part.items()}

    encoder = Dinov2Model(Dinov2Config(**VISION)).eval()
    state = {}
    for name, t in strip("base_model.model.vision_model.", tensors["vision"]).items():
        for new, old in V4_NAMES:
            name = name.replace(old, new)
        state[name] = t
    encoder.load_state_dict(state)
    a = strip("base_model.model.abstractor.", tensors["projector"])
    with torch.no_grad():
        x = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:] + a["pos_emb"]
    x = x.transpose(1, 2).reshape(len(pixels), 32, 4, 4)

    def conv_norm(x, p, act=True, groups=1):
        w = a[p + ".conv.weight"]
        x = F.conv2d(x, w, padding=w.shape[-1] // 2, groups=groups)
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), a[p + ".bn.weight"], a[p + ".bn.bias"], 1e-5)
        x = x.permute(0, 3, 1, 2)
        return F.silu(x) if act else x

    def block(x, p):
        y = conv_norm(conv_norm(x, p + "conv1"), p + "conv2", groups=PROJECTOR["hidden_size"])
        s = F.conv2d(F.silu(F.conv2d(y.mean((2, 3), keepdim=True), a[p + "se.fc1.weight"], a[p + "se.fc1.bias"])),
                     a[p + "se.fc2.weight"], a[p + "se.fc2.bias"])
        y = conv_norm(y * s.sigmoid(), p + "conv3", act=False)
        return F.silu(y + (conv_norm(x, p + "downsample", act=False) if p + "downsample.conv.weight" in a else x))

    with torch.no_grad():
        for b in range(1, PROJECTOR["depth"] + 1):
            x = block(x, f"net.0.b{b}.")
        x = F.adaptive_avg_pool2d(x, 2)
        for b in range(1, PROJECTOR["depth"] + 1):
            x = block(x, f"net.2.b{b}.")
        x = x.flatten(2).transpose(1, 2)
        visual = F.linear(F.silu(F.linear(x, a["readout.0.weight"], a["readout.0.bias"])),
                          a["readout.2.weight"], a["readout.2.bias"])

    llm = MistralForCausalLM(MistralConfig(**LLM)).eval()
    weights = strip("language_model.", tensors["llm"])
    for name, t in strip("base_model.model.language_model.", tensors["lora"]).items():
        if name.endswith("lora_A.weight"):
            target = name.replace(".lora_A.weight", ".weight")
            delta = tensors["lora"]["base_model.model.language_model." + name.replace("lora_A", "lora_B")] @ t
            weights[target] = weights[target] + delta * (ALPHA / R)
    llm.load_state_dict(weights)
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        embeds = llm.get_input_embeddings()(ids_t.masked_fill(ids_t == 32000, 0))
        embeds[ids_t == 32000] = visual.reshape(-1, visual.shape[-1])
        return llm(inputs_embeds=embeds).logits[0]


def test_imported_logits_equal_the_reference_forward(release, imported):
    from m4cxr.tasks import render_conversation
    from m4cxr.model.checkpoint import load_checkpoint

    model, exp = load_checkpoint(imported)
    assert (model.image_size, model.box_convention, model.tokens_per_image) == (56, "center_crop", 4)
    assert exp.model.lora.r == R and exp.model.lora.alpha == ALPHA
    image = Image.new("L", (70, 56))
    image.paste(200, (20, 10, 50, 40))
    pixels = model.preprocess([image])
    conv = render_conversation("single_image", FIELDS)[:2]  # the findings question, as a generation prompt
    batch = model.collate([conv], [[image]], for_generation=True)
    ids = batch["input_ids"][0].tolist()
    # the authors' ids of their own template text (SentencePiece, piece by piece)
    assert ids == sentencepiece_ids(authors_text(expected_turns("single_image")[:1]), 4)[0]
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits[0]
    theirs = reference_logits(release["tensors"], pixels, ids)
    assert (ours - theirs).abs().max() < 1e-5, float((ours - theirs).abs().max())
    assert (theirs - reference_logits({**release["tensors"], "lora": {k: v * 0 for k, v in release["tensors"]["lora"].items()}},
                                      pixels, ids)).abs().max() > 1e-3  # the adapter matters


def test_one_folder_with_the_merged_model_imports_without_an_adapter(release, tmp_path):
    """Their model with the LoRA merged into language_model.* (the layout of a single-folder
    release): a checkpoint without an adapter, with the same logits."""
    from m4cxr.tasks import render_conversation
    from m4cxr.model.checkpoint import load_checkpoint, read_info
    from m4cxr.model.release import import_release

    t = release["tensors"]
    merged = {k.removeprefix("base_model.model."): v for k, v in {**t["vision"], **t["projector"]}.items()}
    merged.update(t["llm"])
    for name, a in t["lora"].items():
        if name.endswith("lora_A.weight"):
            target = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            merged[target] = merged[target] + (t["lora"][name.replace("lora_A", "lora_B")] @ a) * (ALPHA / R)
    folder = tmp_path / "merged"
    folder.mkdir()
    for f in release["stage1"].iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).symlink_to(f)
    save_file(merged, folder / "model.safetensors")
    out = import_release(folder, tmp_path / "out")["checkpoint"]
    assert read_info(out)["merged"] and not (Path(out) / "adapter").exists()
    model, _ = load_checkpoint(out)
    image = Image.new("L", (56, 64), 90)
    batch = model.collate([render_conversation("vqa", {**FIELDS, "answer": ""})[:2]], [[image]], for_generation=True)
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits[0]
    theirs = reference_logits(t, model.preprocess([image]), batch["input_ids"][0].tolist())
    assert (ours - theirs).abs().max() < 1e-5


def test_the_key_map_covers_the_full_size_release_on_the_meta_device():
    """Rad-DINO + C-Abstractor + Mistral-7B with LoRA r 8 as their release names its tensors:
    every one maps to a tensor of our model with its shape, and none of ours is left without one."""
    from transformers import Dinov2Model, MistralForCausalLM

    from m4cxr.model.release import architecture, check_layout, expected_layout, map_key

    vision_cfg = architecture("microsoft/rad-dino", "vision", "")
    llm_cfg = architecture("mistralai/Mistral-7B-Instruct-v0.2", "llm", "")
    with torch.device("meta"):
        theirs = {f"vision_model.{v4(n)}": tuple(t.shape) for n, t in Dinov2Model(vision_cfg).state_dict().items()}
        theirs.update({f"language_model.{n}": tuple(t.shape) for n, t in MistralForCausalLM(llm_cfg).state_dict().items()})
    theirs.update({f"abstractor.{n}": s for n, s in timm_c_abstractor_shapes(3, 768, 1024, 4096, 1369).items()})
    theirs.update(their_lora_shapes(32, 4096, 1024))
    shapes, unknown = {}, []
    for key, shape in theirs.items():
        target = map_key(key)
        if target is None:
            unknown.append(key)
        else:
            shapes.setdefault(target[0], {})[target[1]] = shape
    projector = dict(num_input_tokens=1369, encoder_dim=768, llm_dim=4096, hidden_size=1024, depth=3, mlp_depth=2,
                     num_query_tokens=361)
    expected = expected_layout(vision_cfg, llm_cfg, projector, {"r": 8, "alpha": 32, "target_modules": ["q_proj", "v_proj"]})
    check_layout(shapes, expected, unknown)
    assert {p: len(n) for p, n in shapes.items()} == {p: len(n) for p, n in expected.items()}
    assert len(shapes["lora"]) == 128 and sum(len(n) for n in shapes.values()) == len(theirs)
    params = {p: sum(torch.Size(s).numel() for s in n.values()) for p, n in shapes.items()}
    assert params["llm"] == 7_241_732_096 and 86_000_000 < params["vision"] < 87_000_000
    assert params["lora"] == 32 * (8 * 4096 * 2 + 8 * 4096 + 1024 * 8)
    # a tensor left over, or one missing, is named
    with pytest.raises(ValueError, match="abstractor_extra"):
        check_layout(shapes, expected, ["abstractor_extra.weight"])
    del shapes["projector"]["net.2.b3.se.fc1.bias"]
    with pytest.raises(ValueError, match=r"projector: 1 tensor\(s\) missing: \['net.2.b3.se.fc1.bias'\]"):
        check_layout(shapes, expected, [])


def test_an_unknown_layout_fails_naming_its_tensors(release, tmp_path):
    from m4cxr.model.release import import_release

    odd = tmp_path / "odd"
    odd.mkdir()
    for f in release["stage1"].iterdir():
        (odd / f.name).symlink_to(f)
    (odd / "model.safetensors").unlink()
    t = release["tensors"]
    base = {**{k.removeprefix("base_model.model."): v for k, v in {**t["vision"], **t["projector"]}.items()}, **t["llm"]}
    base["abstractor.net.0.b1.se.bn.weight"] = torch.ones(8)  # a norm in the SE block: not this model's
    del base["language_model.model.norm.weight"]
    save_file(base, odd / "model.safetensors")
    with pytest.raises(ValueError) as err:
        import_release(odd, tmp_path / "out")
    assert "net.0.b1.se.bn.weight" in str(err.value) and "model.norm.weight" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written


def test_checkpoints_of_the_earlier_format_are_refused_with_what_to_do(imported, tmp_path):
    import shutil

    from m4cxr.model.checkpoint import load_checkpoint

    old = tmp_path / "old"
    shutil.copytree(imported, old)
    info = json.loads((old / "m4cxr.json").read_text())
    (old / "m4cxr.json").write_text(json.dumps({**info, "format": "m4cxr-checkpoint-1"}))
    with pytest.raises(ValueError, match="earlier version.*train it again.*m4cxr model import"):
        load_checkpoint(old)


def test_the_projector_equals_timms_where_timm_imports():
    """Where timm loads (GPU machines; it needs torchvision), Honeybee's construction from timm's
    RegStage gives our numbers with the same state dict."""
    try:
        from functools import partial

        from timm.layers import LayerNorm2d
        from timm.models.regnet import RegStage
    except Exception as err:  # noqa: BLE001 -- timm imports torchvision, which may fail to load
        pytest.skip(f"timm does not import here: {type(err).__name__}: {err}")
    from torch import nn

    from m4cxr.model.projector import CAbstractor

    block = partial(RegStage, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)
    net = nn.Sequential(block(2, 32, 48), nn.AdaptiveAvgPool2d((2, 2)), block(2, 48, 48))
    ours = CAbstractor(16, 32, 128, 48, 2, 2, 4).eval()
    ours.net.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(3, 16, 32)
    expected = ours.readout(net.eval()((x + ours.pos_emb).transpose(1, 2).reshape(3, 32, 4, 4)).flatten(2).transpose(1, 2))
    assert torch.allclose(ours(x), expected, atol=1e-6)


@pytest.mark.slow
def test_the_imported_release_is_served_on_both_engines_evaluated_and_fine_tuned(ray_local, imported, synthetic_corpus,
                                                                                tmp_path):
    """What a group does with the release: serve it (vLLM and transformers give the same greedy
    answers), evaluate it on its own test split, and fine-tune it (its LoRA continues; the vision
    encoder and projector train as in stage 2)."""
    import base64
    import io
    import urllib.request

    from ray import serve
    from safetensors.torch import load_file

    from m4cxr.config import load_experiment
    from m4cxr.eval.run import evaluate
    from m4cxr.serve.apps import run_services
    from m4cxr.model.vllm_engine import vllm_installed
    from m4cxr.train.run import run_stage

    corpus, _ = synthetic_corpus
    image = Image.open(next((corpus / "images").glob("*.png"))).convert("L")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()

    def post(url: str, body: dict) -> dict:
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())

    args = dict(max_new_tokens=8, max_prompt_tokens=600, apps=("mrg", "vqa"))
    port = free_port()
    hf = run_services({"release": str(imported)}, port=port, prefix="hf", engine="hf", **args)
    try:
        requests = [("/mrg", {"scenario": "single_image", "images": [b64]}),
                    ("/mrg", {"scenario": "multi_study", "images": [b64], "prior_images": [b64],
                              "prior_report": "No acute process."}),
                    ("/vqa", {"images": [b64], "question": "Is the heart enlarged?"})]
        on_hf = [post(f"{hf}{route}", body) for route, body in requests]
        assert all(isinstance(a.get("report", a.get("answer")), str) for a in on_hf)
        if vllm_installed():
            on_vllm_url = run_services({"release": str(imported)}, port=port, engine="vllm", **args)
            assert [post(f"{on_vllm_url}{route}", body) for route, body in requests] == on_hf
    finally:
        serve.shutdown()

    overrides = [f"train.output_dir={tmp_path / 'train'}", "data.image_size=56", "data.box_convention=center_crop",
                 "model.projector.num_query_tokens=4", "eval.tasks=[single_image,phrase_grounding,vqa]",
                 "eval.samples_per_task=2", "eval.max_new_tokens=6", "eval.both_cot_modes=false",
                 "eval.bootstrap_samples=10", "eval.overlays=0", "train.instruction.training_steps=4",
                 "train.instruction.max_steps=4", "train.instruction.global_batch_size=2", "train.micro_batch_size=1",
                 "train.checkpoint_every=4", "train.val_samples=2", "train.instruction.lr=1e-3",
                 "train.instruction.trainable=[vision_encoder,projector,llm_lora]", "model.lora.dropout=0.05"]
    exp = load_experiment(ROOT / "experiments/quickstart.yaml", overrides)
    results = evaluate(exp, str(imported), tmp_path / "eval", corpus_dir=corpus)
    assert results["mrg"]["single_image"] and results["grounding"]["phrase_grounding"]["samples"] == 2
    assert results["vqa"]["vqa"]["samples"] == 2

    summary = run_stage(exp, "instruction", corpus, init_checkpoint=str(imported), run_name="fine-tune-release")
    assert summary["steps"] == 4
    tuned = Path(summary["checkpoint"])
    before, after = (load_file(f / "adapter" / "adapter_model.safetensors") for f in (imported, tuned))
    # the release's LoRA continues (a fresh adapter would start B at zero, 0.3 away from the release's)
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)
    assert max(float((before[k] - after[k]).abs().max()) for k in before) < 0.05
    assert not torch.equal(load_file(imported / "projector.safetensors")["readout.2.weight"],
                           load_file(tuned / "projector.safetensors")["readout.2.weight"])
    with pytest.raises(ValueError, match="data.image_size is 518 but 56 in the checkpoint"):
        run_stage(load_experiment(ROOT / "experiments/quickstart.yaml", overrides + ["data.image_size=518"]),
                  "instruction", corpus, init_checkpoint=str(imported), run_name="unfit")
