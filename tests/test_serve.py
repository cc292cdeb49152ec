"""Serving: the model application and the four routes over it, started in-process on 127.0.0.1
with tiny checkpoints, on both engines side by side (vLLM at /, transformers at /hf/); every route
with valid and invalid requests, concurrency, batching, DICOM, several checkpoints as LoRA
adapters of one base, the openai client, API keys, and the model's replicas autoscaling."""

import base64
import io
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from m4cxr.config import load_experiment
from m4cxr.data.schema import read_sample_table

from conftest import ROOT, free_port


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def randomize_lora(model, seed: int) -> None:
    """Random LoRA weights (peft starts B at zero, where an adapter changes nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.fixture(scope="module")
def tiny_checkpoints(synthetic_corpus, tmp_path_factory):
    """Two tiny checkpoints with random weights, "default" and "other": the same base LLM with
    different LoRA adapters, as a run's checkpoint and a sweep's winner have."""
    from m4cxr.model.checkpoint import save_checkpoint
    from m4cxr.model.m4cxr import build_model
    from m4cxr.model.tokenizer import corpus_texts, train_tiny_tokenizer

    corpus, _ = synthetic_corpus
    exp = load_experiment(ROOT / "experiments/quickstart.yaml")
    tok = train_tiny_tokenizer(corpus_texts(read_sample_table(corpus, "train").column("turns").to_pylist()[:500]), 500)
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = build_model(exp, tok)
    paths = {}
    for seed, name in ((0, "default"), (1, "other")):
        randomize_lora(model, seed)
        paths[name] = str(save_checkpoint(model, exp, out / name))
    return paths


# health checks every 2 s: a replica whose engine died is replaced within a test's patience
SERVICE_ARGS = dict(max_new_tokens=8, max_batch_size=16, batch_wait_timeout_s=0.05, max_prompt_tokens=400,
                    health_check_period_s=2)


@pytest.fixture(scope="module")
def services(ray_local, tiny_checkpoints):
    """The services on the default engine: vLLM where it is installed."""
    from ray import serve

    from m4cxr.serve.apps import run_services

    yield run_services(tiny_checkpoints, port=free_port(), **SERVICE_ARGS)
    serve.shutdown()


@pytest.fixture(scope="module")
def hf_services(services, tiny_checkpoints):
    """The same services on the transformers engine, beside the first (at /hf/...)."""
    from urllib.parse import urlparse

    from m4cxr.serve.apps import run_services

    return run_services(tiny_checkpoints, port=urlparse(services).port, prefix="hf", engine="hf", **SERVICE_ARGS)


@pytest.fixture(params=["vllm", "hf"])
def each_engine(request, services, hf_services):
    from m4cxr.model.vllm_engine import vllm_installed

    if request.param == "vllm" and not vllm_installed():
        pytest.skip("vLLM is not installed")
    return services if request.param == "vllm" else hf_services


@pytest.fixture(scope="module")
def xray(synthetic_corpus):
    corpus, _ = synthetic_corpus
    return Image.open(next((corpus / "images").glob("*.png"))).convert("L")


def post(url: str, body, headers: dict | None = None, raw: bytes | None = None) -> tuple[int, dict, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            payload = json.loads(text)
        except json.JSONDecodeError:
            payload = {"raw": text.decode(errors="replace")}
        return err.code, payload, dict(err.headers)


@pytest.mark.slow
def test_every_route_answers(each_engine, xray):
    b64 = png_b64(xray)
    status, body, _ = post(f"{each_engine}/mrg", {"scenario": "single_image", "images": [b64]})
    assert status == 200 and set(body) == {"findings", "findings_text", "report", "sentences"}
    assert isinstance(body["report"], str) and body["sentences"] is None
    status, grounded, _ = post(f"{each_engine}/mrg", {"scenario": "single_image", "images": [b64], "grounded": True})
    assert status == 200 and grounded["report"] == body["report"]  # greedy: the same report, with its sentences
    assert all(s["box"] is None for s in grounded["sentences"] if not s["findings"])
    status, body, _ = post(f"{each_engine}/mrg", {"scenario": "multi_study", "images": [b64, b64], "prior_images": [b64],
                                               "prior_report": "No acute process.", "cot": False})
    assert status == 200 and body["findings"] == []
    status, body, _ = post(f"{each_engine}/grounding", {"image": b64, "phrase": "small left pleural effusion"})
    assert status == 200 and {"box", "box_pixels", "answer"} <= set(body)
    if body["box"] is not None:  # random weights may not write a box; when they do it is in range
        assert all(0 <= v <= 100 for v in body["box"])
    status, body, _ = post(f"{each_engine}/grounding", {"image": b64, "box": [10, 20, 40, 60], "ask": "organ"})
    assert status == 200 and isinstance(body["answer"], str)
    status, body, _ = post(f"{each_engine}/vqa", {"images": [b64, b64], "question": "What has changed?"})
    assert status == 200 and isinstance(body["answer"], str)
    with urllib.request.urlopen(f"{each_engine}/v1/models", timeout=30) as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == ["default", "other"]


def events(url: str, body: dict) -> list:
    """The server-sent events of a streamed answer, [DONE] last."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line.decode().strip() for line in r]
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]


@pytest.mark.slow
def test_mrg_streams_the_findings_then_the_report(each_engine, xray):
    body = {"scenario": "multi_image", "images": [png_b64(xray)] * 2}
    status, whole, _ = post(f"{each_engine}/mrg", body)
    streamed = events(f"{each_engine}/mrg", {**body, "stream": True})
    assert status == 200 and streamed[-1] == "[DONE]" and streamed[-2] == whole  # the last object: the answer itself
    parts = [e["part"] for e in streamed[:-2]]
    assert parts and parts == sorted(parts, key=["findings", "report"].index)  # the findings, then the report
    for part, key in (("findings", "findings_text"), ("report", "report")):
        assert "".join(e["text"] for e in streamed[:-2] if e["part"] == part).strip() == whole[key]
    no_cot = events(f"{each_engine}/mrg", {**body, "stream": True, "cot": False})
    assert {e["part"] for e in no_cot[:-2]} <= {"report"} and no_cot[-2]["findings"] == []
    status, payload, _ = post(f"{each_engine}/mrg", {**body, "stream": "yes"})
    assert status == 400 and "field 'stream' must be true or false" in payload["error"]
    status, payload, _ = post(f"{each_engine}/mrg", {**body, "images": ["%%%"], "stream": True})
    assert status == 400 and "not valid base64" in payload["error"]  # a 4xx, not an event in a 200 stream


def bomb_png() -> str:
    """A valid PNG header claiming 50,000 x 50,000 pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


@pytest.mark.slow
def test_bad_requests_get_their_own_4xx(each_engine, xray):
    b64 = png_b64(xray)
    good_png = base64.b64decode(b64)
    corrupt = base64.b64encode(good_png[:60] + b"\0" * 200).decode()
    cases = [
        ("/mrg", None, b"{not json", 400, "not valid JSON"),
        ("/mrg", {"scenario": "single_image"}, None, 400, "missing field 'images'"),
        ("/mrg", {"images": [base64.b64encode(b"hello, not an image").decode()]}, None, 400, "not an image"),
        ("/mrg", {"images": ["%%%not base64%%%"]}, None, 400, "not valid base64"),
        ("/mrg", {"images": [corrupt]}, None, 400, "corrupt PNG"),
        ("/mrg", {"images": [bomb_png()]}, None, 413, "over the limit"),
        ("/mrg", {"scenario": "multi_image", "images": [b64] * 6}, None, 400, "1 to 5 images"),
        ("/mrg", {"scenario": "multi_study", "images": [b64]}, None, 400, "needs the prior study"),
        ("/mrg", {"scenario": "multi_study", "images": [b64] * 6, "prior_images": [b64] * 5, "prior_report": "x"},
         None, 400, "1 to 5 images"),
        ("/mrg", {"scenario": "panorama", "images": [b64]}, None, 400, "field 'scenario' must be one of"),
        ("/mrg", {"images": [b64], "grounded": "yes"}, None, 400, "field 'grounded' must be"),
        ("/grounding", {"image": b64, "box": [10, 20, 140, 60]}, None, 400, "must lie in 0-100"),
        ("/grounding", {"image": b64, "box": "[10,20,30]"}, None, 400, "is not a box"),
        ("/grounding", {"image": b64, "box": [40, 20, 10, 60]}, None, 400, "x1 < x2"),
        ("/grounding", {"image": b64}, None, 400, "give exactly one of"),
        ("/vqa", {"images": [b64], "question": "why? " * 400}, None, 413, "over the context limit"),
        ("/vqa", {"images": [b64, b64, b64], "question": "?"}, None, 400, "1 to 2 images"),
        ("/vqa", {"images": [b64], "question": "   "}, None, 400, "field 'question' is empty"),
        ("/vqa", {"images": [b64], "question": "?", "temperature": 0.5}, None, 400, "['temperature'] are not supported"),
        ("/mrg", {"images": [b64], "findings": True}, None, 400, "['findings'] are not supported by /mrg"),
        ("/grounding", {"image": b64, "phrase": "x", "top_k": 3}, None, 400, "['top_k'] are not supported"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": 2}}, None,
         400, "['logit_bias'] are not supported by /v1/chat/completions"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}, None, 400,
         "field 'max_tokens' must be an integer from 1 to 8"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, None, 400,
         "field 'temperature' must be a number from 0 to 2"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", ""]}, None, 400,
         "empty strings"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True, "n": 2}, None, 400,
         "n > 1 with stream"),
    ]
    for route, body, raw, code, message in cases:
        status, payload, _ = post(f"{each_engine}{route}", body, raw=raw)
        error = payload.get("error", "")
        error = error["message"] if route.startswith("/v1") else error  # OpenAI's shape on /v1
        assert status == code and message in error, (route, body and str(body)[:80], status, payload)
    status, payload, _ = post(f"{each_engine}/vqa", {"images": [b64], "question": "?"},
                              headers={"serve_multiplexed_model_id": "nope"})
    assert status == 404 and "unknown model 'nope'" in payload["error"]


@pytest.mark.slow
def test_sixteen_concurrent_requests_and_batching_changes_nothing(each_engine, xray):
    b64 = png_b64(xray)
    questions = [f"Is there finding number {i} in this image?" for i in range(16)]
    alone = [post(f"{each_engine}/vqa", {"images": [b64], "question": q})[1]["answer"] for q in questions[:4]]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda q: post(f"{each_engine}/vqa", {"images": [b64], "question": q}), questions))
    assert [r[0] for r in results] == [200] * 16
    assert [r[1]["answer"] for r in results[:4]] == alone  # batched answers equal one-by-one answers


@pytest.mark.slow
def test_checkpoints_are_chosen_per_request(each_engine, xray):
    b64 = png_b64(xray)
    body = {"images": [b64], "question": "Is the heart enlarged?"}
    default = post(f"{each_engine}/vqa", body)[1]["answer"]
    again = post(f"{each_engine}/vqa", body, headers={"serve_multiplexed_model_id": "default"})[1]["answer"]
    other = post(f"{each_engine}/vqa", body, headers={"serve_multiplexed_model_id": "other"})
    assert other[0] == 200 and again == default
    assert other[1]["answer"] != default  # different adapters answer differently


@pytest.mark.slow
def test_vllm_answers_as_transformers_does_with_both_adapters_on_one_engine(services, hf_services, xray):
    """Greedy in float32, the vLLM engine (prompt embeddings, LoRA) writes the transformers
    engine's answers, for each checkpoint and for the report's two turns; the checkpoints share one
    engine (one base, two adapters)."""
    from ray import serve

    from m4cxr.model.vllm_engine import vllm_installed

    if not vllm_installed():
        pytest.skip("vLLM is not installed")
    b64 = png_b64(xray)
    for name in ("default", "other"):
        headers = {"serve_multiplexed_model_id": name}
        for route, body in (("/vqa", {"images": [b64], "question": "Is the heart enlarged?"}),
                            ("/mrg", {"scenario": "multi_image", "images": [b64, b64]})):
            on_vllm, on_hf = post(f"{services}{route}", body, headers), post(f"{hf_services}{route}", body, headers)
            assert on_vllm[0] == on_hf[0] == 200 and on_vllm[1] == on_hf[1], (name, route, on_vllm[1], on_hf[1])
    info = serve.get_app_handle("model").options(multiplexed_model_id="other").describe.remote().result()
    assert info["engine"] == "vllm" and info["shares_engine_with"] == ["default", "other"]


@pytest.mark.slow
def test_dicom_is_read_with_its_photometric_interpretation_and_no_patient_data(services):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from m4cxr.serve.inputs import decode_image

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.PatientName, ds.PatientID = "Doe^Jane", "SECRET-123"
    ds.Rows, ds.Columns = 64, 64
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME1"  # high values are dark
    pixels = np.zeros((64, 64), np.uint16)
    pixels[:, 32:] = 4000
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    b64 = base64.b64encode(buf.getvalue()).decode()
    image = np.asarray(decode_image(b64, "image"))
    assert image[:, :32].mean() > 250 and image[:, 32:].mean() < 5  # inverted: MONOCHROME1
    status, body, _ = post(f"{services}/vqa", {"images": [b64], "question": "Is there a pneumothorax?"})
    assert status == 200 and "SECRET" not in json.dumps(body) and "Doe" not in json.dumps(body)


def findings_request(xray) -> list[dict]:
    """A chat asking for the findings of one image, as the openai client sends it."""
    image_part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_b64(xray)}"}}
    return [{"role": "user", "content": [{"type": "text", "text": "radiology image:"}, image_part,
                                         {"type": "text", "text": "Provide a description of the findings."}]}]


@pytest.mark.slow
def test_openai_client_two_turn_chat_with_an_image(services, xray):
    from openai import OpenAI

    client = OpenAI(base_url=f"{services}/v1", api_key="unused", max_retries=0)
    messages = findings_request(xray)
    first = client.chat.completions.create(model="default", messages=messages)
    report = first.choices[0].message.content
    assert first.choices[0].message.role == "assistant" and isinstance(report, str)
    messages += [{"role": "assistant", "content": report},
                 {"role": "user", "content": "Provide the bounding box coordinate of the region this phrase "
                                             "describes: the first sentence."}]
    second = client.chat.completions.create(model="other", messages=messages)
    assert second.model == "other" and isinstance(second.choices[0].message.content, str)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    with pytest.raises(Exception, match="400"):
        client.chat.completions.create(model="default", messages=[{"role": "assistant", "content": "hi"}])


@pytest.mark.slow
def test_openai_client_streams_samples_and_counts(each_engine, services, xray):
    """What the OpenAI contract promises, through the openai client: streamed chunks that add up
    to the answer, n choices, seeded sampling that repeats and temperature that varies, token
    limits and stop strings honoured, usage that matches, unsupported fields refused."""
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=f"{each_engine}/v1", api_key="unused", max_retries=0)
    messages = findings_request(xray)
    plain = client.chat.completions.create(model="default", messages=messages)
    answer = plain.choices[0].message.content
    assert plain.usage.prompt_tokens > 16 and 1 <= plain.usage.completion_tokens <= 8  # the server's 8 new tokens

    chunks = list(client.chat.completions.create(model="default", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    # vLLM streams token by token, transformers' streamer word by word
    assert len(pieces) >= (2 if each_engine == services else min(2, len(answer.split())))
    assert "".join(pieces).strip() == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [plain.choices[0].finish_reason]
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()

    two = client.chat.completions.create(model="default", messages=messages, n=2)
    assert [c.index for c in two.choices] == [0, 1] and all(c.message.content == answer for c in two.choices)
    assert two.usage.completion_tokens == 2 * plain.usage.completion_tokens

    def sample(seed):
        return client.chat.completions.create(model="default", messages=messages, temperature=1.5, top_p=1.0,
                                              seed=seed).choices[0].message.content
    assert sample(7) == sample(7)  # a seed makes sampling repeatable
    assert len({sample(seed) for seed in range(6)}) >= 2  # and temperature makes it vary

    short = client.chat.completions.create(model="default", messages=messages, max_tokens=2)
    assert short.usage.completion_tokens <= 2
    assert short.choices[0].finish_reason == ("stop" if short.usage.completion_tokens < 2 else "length")
    words = answer.split()
    if len(words) >= 2:  # stop at the answer's second word: the text ends before it
        stopped = client.chat.completions.create(model="default", messages=messages, stop=[words[1]])
        content = stopped.choices[0].message.content
        assert words[1] not in content and answer.startswith(content) and stopped.choices[0].finish_reason == "stop"

    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.chat.completions.create(model="default", messages=messages, frequency_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="my_field"):
        client.chat.completions.create(model="default", messages=messages, extra_body={"my_field": 1})


@pytest.mark.slow
def test_each_application_takes_only_its_own_args_and_the_model_keeps_its_token_limit(services, tiny_checkpoints,
                                                                                     xray):
    from ray import serve

    from m4cxr.serve.apps import build

    with pytest.raises(ValueError, match=r"args \['max_batch_size'\] are not its own"):
        build("vqa", {"checkpoints": tiny_checkpoints, "max_batch_size": 4})
    with pytest.raises(ValueError, match=r"args \['api_keys'\] are not its own"):
        build("model", {"checkpoints": tiny_checkpoints, "api_keys": ["k"]})
    # a route allowing more new tokens than the shared model server (8 here) gets its refusal
    serve.run(build("vqa", {"checkpoints": tiny_checkpoints, "max_new_tokens": 64}), name="long", route_prefix="/long")
    try:
        status, payload, _ = post(f"{services}/long", {"images": [png_b64(xray)], "question": "?"})
        assert status == 400 and "generates at most 8" in payload["error"], payload
    finally:
        serve.delete("long")


@pytest.mark.slow
def test_api_keys_are_required_when_set_and_never_logged(services, tiny_checkpoints, monkeypatch):
    import glob

    import openai
    from openai import OpenAI
    from ray import serve

    from m4cxr.serve.access import hash_key, key_hashes
    from m4cxr.serve.apps import build

    key, env_key = "m4cxr-test-key-7f3a91", "m4cxr-env-key-55d0c2"
    monkeypatch.setenv("M4CXR_API_KEYS", env_key)
    assert key_hashes([hash_key(key)]) == sorted([hash_key(key), hash_key(env_key)])
    with pytest.raises(ValueError, match="64 lower-case hex"):
        key_hashes(["sha256:abc"])
    # the config holds only the key's hash; the other key comes from the environment
    serve.run(build("v1", {"checkpoints": tiny_checkpoints, "api_keys": [hash_key(key)], "max_new_tokens": 4}),
              name="keyed", route_prefix="/keyed/v1")
    try:
        base = f"{services}/keyed/v1"
        messages = [{"role": "user", "content": "Is there a pneumothorax?"}]
        for good in (key, env_key):
            answer = OpenAI(base_url=base, api_key=good, max_retries=0).chat.completions.create(
                model="default", messages=messages)
            assert isinstance(answer.choices[0].message.content, str)
        with pytest.raises(openai.AuthenticationError, match="invalid API key"):
            OpenAI(base_url=base, api_key="wrong", max_retries=0).chat.completions.create(model="default",
                                                                                           messages=messages)
        status, payload, headers = post(f"{base}/chat/completions", {"messages": messages})
        assert status == 401 and "Authorization: Bearer" in payload["error"]["message"]
        assert {k.lower(): v for k, v in headers.items()}["www-authenticate"] == "Bearer"
        status, _, _ = post(f"{base}/chat/completions", {"messages": messages}, headers={"Authorization": "Basic x"})
        assert status == 401
        assert post(f"{services}/v1/chat/completions", {"messages": messages})[0] == 200  # the open services stay open
    finally:
        serve.delete("keyed")
    from m4cxr.ray_cluster import local_logs

    logs = [p for p in glob.glob(f"{local_logs()}/**/*", recursive=True) if os.path.isfile(p)]  # this run's Ray
    assert logs
    for path in logs:
        text = open(path, errors="replace").read()
        assert key not in text and env_key not in text, path


def test_checkpoints_share_an_engine_only_with_the_same_base_and_tokenizer(tiny_checkpoints, tmp_path):
    """A sweep's winner (other adapter, same frozen base) shares the default's engine; a checkpoint
    whose LLM was trained, or whose tokenizer differs, gets its own."""
    import shutil

    from safetensors.torch import load_file, save_file

    from m4cxr.model.vllm_engine import engine_groups

    trained, retokenized = tmp_path / "trained", tmp_path / "retokenized"
    shutil.copytree(tiny_checkpoints["default"], trained)
    weights = load_file(trained / "llm/model.safetensors")
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[name] = weights[name] + 0.01
    save_file(weights, trained / "llm/model.safetensors", metadata={"format": "pt"})
    shutil.copytree(tiny_checkpoints["default"], retokenized)
    config = json.loads((retokenized / "tokenizer/tokenizer_config.json").read_text())
    (retokenized / "tokenizer/tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    groups = engine_groups({**tiny_checkpoints, "trained": str(trained), "retokenized": str(retokenized)})
    assert sorted(groups.values()) == [["default", "other"], ["retokenized"], ["trained"]]


def test_vllm_settings_are_refused_on_the_transformers_engine(tiny_checkpoints):
    from m4cxr.serve.model_server import ModelServer

    with pytest.raises(ValueError, match=r"engine_args \['max_num_seqs'\] are vLLM's, but the engine here is 'hf'"):
        ModelServer.func_or_class(tiny_checkpoints, engine="hf", engine_args={"max_num_seqs": 4})


def test_a_model_server_whose_init_failed_is_finalized_quietly(tiny_checkpoints):
    """__del__ runs on an object whose __init__ raised (or never ran): it has nothing to stop."""
    from m4cxr.serve.model_server import ModelServer

    cls = ModelServer.func_or_class
    server = cls.__new__(cls)
    with pytest.raises(ValueError, match="engine must be one of"):
        server.__init__(tiny_checkpoints, engine="tpu")
    server.__del__()
    cls.__new__(cls).__del__()  # __init__ never ran: no attribute at all


def test_health_check_fails_when_the_model_cannot_generate(tiny_checkpoints):
    import asyncio

    from m4cxr.model.checkpoint import load_checkpoint
    from m4cxr.serve.model_server import probe_generation

    model, _ = load_checkpoint(tiny_checkpoints["default"])
    model.system_prompt = "You are a radiology assistant."
    asyncio.run(probe_generation(model))  # healthy

    async def engine_down(conv, images):
        raise RuntimeError("EngineDeadError: EngineCore encountered an issue")

    with pytest.raises(RuntimeError, match="unhealthy: the model cannot generate"):
        asyncio.run(probe_generation(model, engine_down))

    def lost_device(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    model.generate = lost_device
    with pytest.raises(RuntimeError, match="unhealthy: the model cannot generate"):
        asyncio.run(probe_generation(model))
    model.generate = lambda *a, **k: []
    with pytest.raises(RuntimeError, match="unhealthy"):
        asyncio.run(probe_generation(model))


@pytest.mark.slow
def test_over_capacity_gets_503_with_retry_after_and_accepted_requests_finish(services, tiny_checkpoints, xray):
    from ray import serve

    from m4cxr.serve.apps import build

    app = build("vqa", {"checkpoints": tiny_checkpoints, "max_new_tokens": 8,
                        "max_ongoing_requests": 1, "max_queued_requests": 1, "retry_after_s": 3})
    serve.run(app, name="busy", route_prefix="/busy")
    b64 = png_b64(xray)
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda i: post(f"{services}/busy", {"images": [b64], "question": f"Question {i}?"}),
                                range(12)))
    codes = [r[0] for r in results]
    assert set(codes) == {200, 503}, codes  # some served, the rest shed; nothing else
    assert all(isinstance(r[1]["answer"], str) for r in results if r[0] == 200)
    assert all({k.lower(): v for k, v in r[2].items()}.get("retry-after") == "3" for r in results if r[0] == 503), \
        [r[2] for r in results if r[0] == 503][:1]
    serve.delete("busy")


@pytest.mark.slow
def test_model_replicas_rise_under_sustained_load_and_fall_after(services, tiny_checkpoints, xray):
    """The model application, on the default engine (vLLM where installed), autoscales on the
    load the routes send it (short delays here)."""
    import threading
    import time

    from ray import serve

    from m4cxr.serve.apps import build

    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
               "downscale_delay_s": 3, "metrics_interval_s": 0.5, "look_back_period_s": 2}
    serve.run(build("model", {"checkpoints": tiny_checkpoints, "max_new_tokens": 16, "max_batch_size": 1,
                              "autoscaling_config": scaling, "ray_actor_options": {"num_cpus": 0.1}}),
              name="scaling", route_prefix=None)
    serve.run(build("vqa", {"checkpoints": tiny_checkpoints, "max_new_tokens": 16, "model_app": "scaling"}),
              name="scaled", route_prefix="/scaled")

    def replicas() -> int:
        return serve.status().applications["scaling"].deployments["ModelServer"].replica_states.get("RUNNING", 0)

    try:
        assert replicas() == 1
        b64, stop, codes = png_b64(xray), threading.Event(), []

        def load():
            while not stop.is_set():
                codes.append(post(f"{services}/scaled", {"images": [b64], "question": "Is the heart enlarged?"})[0])

        # three clients: twice the target's load, leaving the second core to start the new
        # replica (a vLLM engine takes 30-50 s to start here)
        workers = [threading.Thread(target=load) for _ in range(3)]
        for w in workers:
            w.start()
        started, deadline, peak = time.time(), time.time() + 240, 1
        while time.time() < deadline and peak < 2:
            peak = max(peak, replicas())
            time.sleep(0.5)
        stop.set()
        for w in workers:
            w.join(timeout=120)
        assert peak == 2, "the model did not scale up under load"
        print(f"2 replicas after {time.time() - started:.0f} s under load, {len(codes)} requests")
        assert codes and set(codes) == {200}, set(codes)
        deadline = time.time() + 90
        while time.time() < deadline and replicas() > 1:
            time.sleep(0.5)
        assert replicas() == 1, "the model did not scale down after the load"
    finally:
        serve.delete("scaled")
        serve.delete("scaling")


@pytest.mark.slow
def test_a_killed_vllm_engine_gets_503s_until_serve_replaces_its_replica(services, xray):
    """SIGKILL the vLLM engine process under the model replica: requests get 503 with Retry-After
    (never a 500) until Serve's health check has replaced the replica, then the same answer as
    before, from a new replica."""
    import signal
    import time

    import psutil
    import ray
    from ray.util.state import list_actors

    from m4cxr.model.vllm_engine import vllm_installed

    if not vllm_installed():
        pytest.skip("vLLM is not installed")

    def replica() -> tuple[str, int]:
        # this test's cluster by its address: another Ray instance on the machine is not asked
        alive = [a for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                        filters=[("class_name", "=", "ServeReplica:model:ModelServer")])
                 if a.state == "ALIVE"]
        assert len(alive) == 1, alive
        return alive[0].actor_id, alive[0].pid

    body = {"images": [png_b64(xray)], "question": "Is the heart enlarged?"}
    status, before, _ = post(f"{services}/vqa", body)
    assert status == 200
    actor, pid = replica()
    children = psutil.Process(pid).children()
    # vLLM titles it VLLM::EngineCore: in the command line when setproctitle can rewrite argv, in
    # the 15-character process name ("VLLM::EngineCor") always; failing both, the replica's one
    # spawned child besides multiprocessing's resource tracker
    engines = [c for c in children if "EngineCor" in " ".join(c.cmdline()) + " " + c.name()]
    if not engines:
        engines = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
    assert len(engines) == 1, [(c.name(), c.cmdline()) for c in children]
    engines[0].send_signal(signal.SIGKILL)
    seen, deadline = [], time.time() + 240
    while time.time() < deadline:
        status, payload, headers = post(f"{services}/vqa", body)
        seen.append(status)
        if status == 200:
            break
        assert status == 503 and {k.lower(): v for k, v in headers.items()}.get("retry-after"), (status, payload)
        time.sleep(1)
    assert seen[-1] == 200, seen[-5:]
    assert 503 in seen and payload == before  # refused while down; the new replica answers as the old one did
    assert replica()[0] != actor


@pytest.mark.parametrize("name", ["config.yaml", "config.gpu.yaml"])
def test_serve_config_files_match_the_applications(name):
    """Ray's schema accepts the config files; their import paths, args and deployment names are the
    applications' own; every route calls the model application the file defines."""
    import importlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from m4cxr.serve import apps

    config = yaml.safe_load((ROOT / "serve_apps" / name).read_text())
    ServeDeploySchema.model_validate(config)
    models = {a["name"] for a in config["applications"] if a["import_path"].endswith(":model_app")}
    assert len(models) == 1
    for app in config["applications"]:
        module, builder = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), builder))
        kind = builder.removesuffix("_app").replace("chat", "v1")
        own = apps.MODEL_ARGS if kind == "model" else apps.ROUTE_ARGS
        assert set(app["args"]) <= set(apps.BOTH_ARGS + own + apps.DEPLOYMENT_ARGS), app["name"]
        if kind == "ui":
            from m4cxr.serve.ui import UIService as cls
        else:
            cls = apps.ModelServer if kind == "model" else apps.SERVICES[kind]
        assert [d["name"] for d in app["deployments"]] == [cls.name]
        if kind != "model":
            assert app["args"]["model_app"] in models and app["route_prefix"]
            # the routes' closed-by-default check reads the address the file binds
            assert app["args"].get("host", "127.0.0.1") == config["http_options"]["host"], app["name"]


def test_services_beyond_loopback_refuse_to_start_without_api_keys(tiny_checkpoints, monkeypatch):
    """Closed by default off the machine: a route that would listen on 0.0.0.0 or a node's
    address with no keys is refused, with how to set keys; keys, loopback, or
    allow_unauthenticated: true (a bool, in so many words) let it start."""
    from m4cxr.serve.apps import build, run_services

    monkeypatch.delenv("M4CXR_API_KEYS", raising=False)
    args = {"checkpoints": tiny_checkpoints}
    for host in ("0.0.0.0", "10.1.2.3", "::"):
        with pytest.raises(ValueError, match="beyond this machine, with no API keys") as refused:
            build("mrg", {**args, "host": host})
        assert "M4CXR_API_KEYS" in str(refused.value) and "allow_unauthenticated: true" in str(refused.value)
    with pytest.raises(ValueError, match="must be true or false"):
        build("vqa", {**args, "host": "0.0.0.0", "allow_unauthenticated": "yes"})
    with pytest.raises(ValueError, match="beyond this machine"):  # refused before Serve is started
        run_services(tiny_checkpoints, host="0.0.0.0", port=free_port())
    for allowed in ({"host": "127.0.0.1"}, {"host": "::1"}, {"host": "0.0.0.0", "api_keys": ["k1"]},
                    {"host": "0.0.0.0", "allow_unauthenticated": True}):
        assert build("grounding", {**args, **allowed}) is not None, allowed
    monkeypatch.setenv("M4CXR_API_KEYS", "from-the-environment")
    assert build("v1", {**args, "host": "0.0.0.0"}) is not None
