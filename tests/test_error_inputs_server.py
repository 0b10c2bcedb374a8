"""`dinalrm-serve`'s error inputs: every bad request answers a JSON 4xx naming the problem (never a 500), every bad
command line exits naming the option; one oversized request cannot push other clients past their deadline; the body
parser survives random bodies (hypothesis) and `/healthz` keeps answering."""

import asyncio
import base64
import io
import json
import math
import time

import httpx
import pytest
import torch
from conftest import REPO_ROOT
from error_inputs import ErrorInput, assert_message, rows
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save

from dinalrm.serving.server import PROTOCOL_HEADER, ServeOptions, build_parser, create_app, options_from_args
from pipeline_dinalrm import MAX_IMAGE_PIXELS, DiNaLRMPipeline


TINY = str(REPO_ROOT / "assets" / "dinalrm-tiny")
HEADERS = {"content-type": "application/octet-stream", PROTOCOL_HEADER: "1"}
MAX_IMAGES = 3


@pytest.fixture(scope="module")
def pipe():
    pipe = DiNaLRMPipeline.from_pretrained(TINY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def client(pipe):
    app = create_app(ServeOptions(model=TINY, max_wait_ms=1, max_images=MAX_IMAGES), loader=lambda options: pipe)
    with TestClient(app) as test_client:
        while test_client.get("/healthz").status_code != 200:
            time.sleep(0.01)
        yield test_client


def _config(pipe) -> dict:
    """Sizes read from the tiny model's own config."""
    config = pipe.reward_model.config
    backbone = config.backbone_config
    return {
        "channels": backbone["in_channels"],
        "max_side": backbone["pos_embed_max_size"] * config.latent_patch_size,
        "patch": config.latent_patch_size,
        "dim": backbone["joint_attention_dim"],
        "pooled": backbone["pooled_projection_dim"],
        "max_tokens": 77 + max(512, config.max_sequence_length),
    }


def latent_body(pipe, batch=1, side=8, tokens=8, dim=None, pooled=None, fill=None, **overrides) -> bytes:
    c = _config(pipe)
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "latents": torch.randn(batch, c["channels"], side, side, generator=generator),
        "prompt_embeds": torch.randn(batch, tokens, dim or c["dim"], generator=generator),
        "pooled_prompt_embeds": torch.randn(batch, pooled or c["pooled"], generator=generator),
        "u": torch.full((batch,), 0.4),
    }
    if fill is not None:
        tensors["latents"].fill_(fill)
    tensors.update(overrides)
    return save({name: value.contiguous() for name, value in tensors.items()})


def png(size=(40, 32), color="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def pixel_bomb() -> bytes:
    """A few kilobytes of PNG that decode to more than `MAX_IMAGE_PIXELS` pixels."""
    side = math.isqrt(MAX_IMAGE_PIXELS) + 16
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Each input builds `(path, request keyword arguments)` from the pipeline; the error is the HTTP status.
LATENTS = "/v1/score"
IMAGES = "/v1/score_images"
SERVER_ERROR_INPUTS = [
    ErrorInput(
        "latents above the maximum side",
        lambda p: (LATENTS, {"content": latent_body(p, side=_config(p)["max_side"] + 2)}),
        400,
        "exceeds the backbone's maximum",
    ),
    ErrorInput("7x7 latents", lambda p: (LATENTS, {"content": latent_body(p, side=7)}), 400, "divisible by the patch"),
    ErrorInput("0x0 latents", lambda p: (LATENTS, {"content": latent_body(p, side=0)}), 400, "no pixel"),
    ErrorInput(
        "wrong prompt_embeds width",
        lambda p: (LATENTS, {"content": latent_body(p, dim=_config(p)["dim"] + 1)}),
        400,
        "prompt_embeds have dim",
    ),
    ErrorInput(
        "wrong pooled width",
        lambda p: (LATENTS, {"content": latent_body(p, pooled=_config(p)["pooled"] + 3)}),
        400,
        "pooled_prompt_embeds have dim",
    ),
    ErrorInput(
        "prompt longer than the model's text limit",
        lambda p: (LATENTS, {"content": latent_body(p, tokens=_config(p)["max_tokens"] + 1)}),
        400,
        "--max-prompt-tokens",
    ),
    ErrorInput("0-token prompt", lambda p: (LATENTS, {"content": latent_body(p, tokens=0)}), 400, "0 tokens"),
    ErrorInput(
        "1e30 latents score non-finite",
        lambda p: (LATENTS, {"content": latent_body(p, batch=2, fill=3e38)}),
        422,
        r"sample\(s\) \[0, 1\].*not finite",
    ),
    ErrorInput(
        "pixel bomb",
        lambda p: (IMAGES, {"json": {"images": [b64(pixel_bomb())], "prompts": ["x"]}}),
        400,
        "megapixels; the limit",
    ),
    ErrorInput(
        "pixel bomb multipart",
        lambda p: (IMAGES, {"files": [("images", ("b.png", pixel_bomb(), "image/png"))], "data": {"prompts": "x"}}),
        400,
        "megapixels; the limit",
    ),
    ErrorInput(
        "truncated PNG",
        lambda p: (IMAGES, {"json": {"images": [b64(png()[:60])], "prompts": ["x"]}}),
        400,
        "not a readable",
    ),
    ErrorInput(
        "seed 2**70",
        lambda p: (IMAGES, {"json": {"images": [b64(png())], "prompts": ["x"], "seed": 2**70}}),
        400,
        "seed",
    ),
    ErrorInput(
        "negative seed",
        lambda p: (IMAGES, {"json": {"images": [b64(png())], "prompts": ["x"], "seed": -1}}),
        400,
        "seed",
    ),
    ErrorInput(
        "multipart seed 2**70",
        lambda p: (
            IMAGES,
            {"files": [("images", ("a.png", png(), "image/png"))], "data": {"prompts": "x", "seed": str(2**70)}},
        ),
        400,
        "seed",
    ),
    ErrorInput(
        "multipart t not a number",
        lambda p: (
            IMAGES,
            {"files": [("images", ("a.png", png(), "image/png"))], "data": {"prompts": "x", "t": "high"}},
        ),
        400,
        "must be a number",
    ),
    ErrorInput(
        "NaN t in JSON",
        lambda p: (
            IMAGES,
            {
                "content": b'{"images": ["' + b64(png()).encode() + b'"], "prompts": ["x"], "t": NaN}',
                "headers": {"content-type": "application/json"},
            },
        ),
        400,
        r"\[0, 1\]",
    ),
    ErrorInput(
        "more images than --max-images",
        lambda p: (IMAGES, {"json": {"images": [b64(png())] * (MAX_IMAGES + 1), "prompts": ["x"]}}),
        400,
        "--max-images",
    ),
    ErrorInput(
        "JSON nested 100000 deep",
        lambda p: (
            IMAGES,
            {"content": b"[" * 100000 + b"]" * 100000, "headers": {"content-type": "application/json"}},
        ),
        400,
        "not valid JSON",
    ),
    ErrorInput(
        "body not UTF-8",
        lambda p: (IMAGES, {"content": b"\xff\xfe{", "headers": {"content-type": "application/json"}}),
        400,
        "not valid JSON",
    ),
    ErrorInput(
        "prompt file in multipart",
        lambda p: (
            IMAGES,
            {"files": [("images", ("a.png", png(), "image/png")), ("prompts", ("p.txt", b"x", "text/plain"))]},
        ),
        400,
        "prompts",
    ),
]


@pytest.mark.parametrize("row", rows(SERVER_ERROR_INPUTS))
def test_server_error_inputs(client, pipe, row):
    path, kwargs = row.input(pipe)
    if path == LATENTS:
        kwargs = {"headers": HEADERS, **kwargs}
    response = client.post(path, **kwargs)
    assert response.status_code == row.error, response.text
    error = response.json()["error"]  # a JSON body, whatever the status
    assert_message(row, error)
    assert client.get("/healthz").status_code == 200


CLI_ERROR_INPUTS = [
    ErrorInput("port above 65535", ["--port", "99999"], SystemExit, "--port must be a TCP port"),
    ErrorInput("port 0", ["--port", "0"], SystemExit, "--port must be a TCP port"),
    ErrorInput("negative port", ["--port", "-1"], SystemExit, "--port must be a TCP port"),
    ErrorInput("max prompt tokens 0", ["--max-prompt-tokens", "0"], SystemExit, "--max-prompt-tokens"),
    ErrorInput("max images 0", ["--max-images", "0"], SystemExit, "--max-images"),
    ErrorInput("NaN deadline", ["--request-timeout-s", "nan"], SystemExit, "--request-timeout-s"),
    ErrorInput("max batch size 0", ["--max-batch-size", "0"], SystemExit, "--max-batch-size"),
]


@pytest.mark.parametrize("row", rows(CLI_ERROR_INPUTS))
def test_serve_command_line_error_inputs(row):
    args = build_parser().parse_args(["--model", TINY, *row.input])
    with pytest.raises(row.error) as raised:
        options_from_args(args)
    assert_message(row, str(raised.value))


def test_broken_model_nan_scores_are_a_json_error_naming_the_sample(pipe, monkeypatch):
    """A model whose weights hold NaN: the request gets a JSON 422 naming its samples, not a plain-text 500."""

    def nan_scores(latents, *args, **kwargs):
        return torch.full((latents.shape[0],), float("nan"))

    monkeypatch.setattr(pipe.reward_model, "score_latents", nan_scores)
    app = create_app(ServeOptions(model=TINY, max_wait_ms=1), loader=lambda options: pipe)
    with TestClient(app) as test_client:
        while test_client.get("/healthz").status_code != 200:
            time.sleep(0.01)
        response = test_client.post("/v1/score", content=latent_body(pipe, batch=3), headers=HEADERS)
        assert response.status_code == 422 and "[0, 1, 2]" in response.json()["error"]
        assert test_client.get("/healthz").status_code == 200


# ------------------------------------------------------------------------------------------ fairness
def test_one_oversized_request_cannot_push_other_clients_past_their_deadline(pipe, monkeypatch):
    """A model call costs SAMPLE_COST per sample. One client sends OVERSIZED samples (OVERSIZED * SAMPLE_COST
    exceeds every deadline); four others send one sample each, one after another. The large request runs chunk by
    chunk with theirs in between, so their p95 latency stays below the deadline and all get 200; the large request
    is dropped at its deadline and stops holding the worker (a bounded number of chunks ran)."""
    sample_cost, max_batch, oversized, deadline = 0.02, 2, 400, 1.5
    calls = []
    score_latents = pipe.reward_model.score_latents

    def costly(latents, *args, **kwargs):
        calls.append(latents.shape[0])
        time.sleep(sample_cost * latents.shape[0])
        return score_latents(latents, *args, **kwargs)

    monkeypatch.setattr(pipe.reward_model, "score_latents", costly)
    options = ServeOptions(model=TINY, max_batch_size=max_batch, max_wait_ms=1, request_timeout_s=deadline)
    app = create_app(options, loader=lambda options: pipe)
    small = latent_body(pipe, batch=1)
    large = latent_body(pipe, batch=oversized)

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
                while (await http.get("/healthz")).status_code != 200:
                    await asyncio.sleep(0.01)

                async def one_client(delay):
                    await asyncio.sleep(delay)
                    latencies = []
                    for _ in range(5):
                        start = time.monotonic()
                        response = await http.post("/v1/score", content=small, headers=HEADERS)
                        latencies.append((time.monotonic() - start, response.status_code))
                    return latencies

                big = asyncio.create_task(http.post("/v1/score", content=large, headers=HEADERS))
                others = await asyncio.gather(*(one_client(0.05 + 0.01 * i) for i in range(4)))
                return await big, [item for client in others for item in client]

    big, others = asyncio.run(scenario())
    latencies = sorted(latency for latency, _ in others)
    assert all(status == 200 for _, status in others), others
    p95 = latencies[math.ceil(0.95 * len(latencies)) - 1]
    assert p95 < deadline, latencies
    assert big.status_code == 503 and "deadline" in big.json()["error"]
    # the large request ran at most until its deadline (plus the chunk in flight), never all its samples
    large_samples = sum(calls) - len(others)
    assert large_samples < oversized
    assert large_samples * sample_cost < deadline + max_batch * sample_cost + 0.5


# ------------------------------------------------------------------------------------------ fuzzing
FLOAT_VALUES = st.sampled_from([0.0, 1.0, -1.0, 1e30, -1e30, float("nan"), float("inf"), 65504.0, 1e-40])
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8])


@st.composite
def latent_requests(draw):
    """Random `/v1/score` bodies: any subset of the tensors, random shapes, dtypes and values, extra tensors."""
    tensors = {}
    for name in ("latents", "prompt_embeds", "pooled_prompt_embeds", "u", "seeds", "extra"):
        if draw(st.booleans()) or (name != "extra" and draw(st.integers(0, 3)) > 0):
            shape = draw(st.lists(st.integers(0, 40), min_size=0, max_size=4))
            dtype = draw(DTYPES)
            value = draw(FLOAT_VALUES)
            tensor = torch.zeros(shape, dtype=torch.float64)
            if tensor.numel():
                tensor = tensor.normal_(generator=torch.Generator().manual_seed(draw(st.integers(0, 9)))) + (
                    value if math.isfinite(value) else 0
                )
                if not math.isfinite(value) and draw(st.booleans()):
                    tensor.view(-1)[0] = value
            tensors[name] = tensor.to(dtype) if dtype.is_floating_point else tensor.clamp(-100, 100).to(dtype)
    return save(tensors)


HEADER_VARIANTS = st.sampled_from(
    [HEADERS, {"content-type": "application/octet-stream"}, {**HEADERS, PROTOCOL_HEADER: "2"}, {PROTOCOL_HEADER: "1"}]
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(latent_requests(), st.binary(max_size=64)), headers=HEADER_VARIANTS)
def test_fuzzed_latent_bodies_get_200_or_a_json_4xx(client, body, headers):
    response = client.post("/v1/score", content=body, headers=headers)
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    payload = response.json()
    if response.status_code == 200:
        assert all(math.isfinite(score) for score in payload["raw_scores"])
    else:
        assert payload["error"]
    assert client.get("/healthz").status_code == 200


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


@st.composite
def image_payloads(draw):
    """Random `/v1/score_images` JSON bodies: real or broken images, odd sizes, prompts, t and seed of any type."""
    payload = draw(st.dictionaries(st.sampled_from(["images", "prompts", "prompt", "t", "seed", "x"]), JSON_VALUES))
    if draw(st.booleans()):
        sizes = st.tuples(st.integers(1, 80), st.integers(1, 80))
        images = draw(st.lists(sizes, min_size=1, max_size=MAX_IMAGES + 1))
        payload["images"] = [b64(png(size))[: draw(st.sampled_from([None, 40]))] for size in images]
    if draw(st.booleans()):
        payload["prompts"] = draw(st.sampled_from(["a red circle", ["a", "b"], "", [" "], 3]))
    if draw(st.booleans()):
        payload["t"] = draw(st.sampled_from([0.3, -0.1, 2, float("nan"), "0.3", True]))
    if draw(st.booleans()):
        payload["seed"] = draw(st.sampled_from([0, 2**63 - 1, 2**63, 2**70, -5, 1.5, "7"]))
    return payload


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=image_payloads())
def test_fuzzed_image_bodies_get_200_or_a_json_4xx(client, payload):
    content = json.dumps(payload).encode()  # Python's JSON: NaN and Infinity spelled out, as lenient clients send
    response = client.post("/v1/score_images", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    assert response.json()
    assert client.get("/healthz").status_code == 200
