"""`dinalrm-serve`: verl-omni's latent protocol (version 1), its errors, micro-batching, deadlines and the image
endpoint, on the bundled tiny model; the expected scores come from direct `DiNaLRMPipeline` calls."""

import asyncio
import base64
import io
import os
import subprocess
import threading
import time

import httpx
import pytest
import tolerances
import torch
from conftest import REPO_ROOT, free_port
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save

from dinalrm.serving.server import PROTOCOL_HEADER, ServeOptions, build_parser, create_app
from pipeline_dinalrm import DiNaLRMPipeline


TINY = str(REPO_ROOT / "assets" / "dinalrm-tiny")
HEADERS = {"content-type": "application/octet-stream", PROTOCOL_HEADER: "1"}


@pytest.fixture(scope="module")
def pipe():
    pipe = DiNaLRMPipeline.from_pretrained(TINY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inputs(pipe):
    """Latents and prompt embeddings of four samples (prompt embeddings padded to the client's 77 + 256 tokens)."""
    generator = torch.Generator().manual_seed(0)
    channels = pipe.reward_model.config.backbone_config["in_channels"]
    embeds, pooled = pipe.encode_prompt(["a red circle", "a blue square", "a green cross", "a white field"], "cpu")
    return torch.randn(4, channels, 8, 8, generator=generator), embeds, pooled


def body(latents, embeds, pooled, u, seeds=None, **extra) -> bytes:
    tensors = {"latents": latents, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "u": u, **extra}
    if seeds is not None:
        tensors["seeds"] = seeds
    return save({name: value.contiguous() for name, value in tensors.items()})


def expected(pipe, latents, embeds, pooled, u: float, seed: int) -> float:
    """The unbatched pipeline call the server must reproduce for one sample."""
    generator = torch.Generator().manual_seed(seed)
    return (
        pipe(latents=latents, prompt_embeds=embeds, pooled_prompt_embeds=pooled, t=u, generator=generator)
        .rewards[0]
        .item()
    )


def wait_ready(client) -> None:
    for _ in range(600):
        if client.get("/healthz").status_code == 200:
            return
        time.sleep(0.01)
    raise AssertionError("the server did not load")


@pytest.fixture
def client(pipe):
    app = create_app(ServeOptions(model=TINY, max_wait_ms=5), loader=lambda options: pipe)
    with TestClient(app) as test_client:
        wait_ready(test_client)
        yield test_client


def test_scores_equal_unbatched_pipeline_calls(client, pipe, inputs):
    latents, embeds, pooled = inputs
    for i, (u, seed) in enumerate([(0.4, 0), (0.1, 7), (0.9, 123456789), (0.55, 2**40)]):
        response = client.post(
            "/v1/score",
            content=body(
                latents[i : i + 1],
                embeds[i : i + 1],
                pooled[i : i + 1],
                torch.tensor([u]),
                torch.tensor([seed], dtype=torch.int64),
            ),
            headers=HEADERS,
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        result = response.json()
        assert result["protocol_version"] == "1" and len(result["raw_scores"]) == 1
        u32 = torch.tensor(u).item()  # the client sends float32 levels
        target = expected(pipe, latents[i : i + 1], embeds[i : i + 1], pooled[i : i + 1], u32, seed)
        assert result["raw_scores"][0] == tolerances.close_to(target)


def test_batch_request_with_per_sample_levels_and_seeds(client, pipe, inputs):
    latents, embeds, pooled = inputs
    u, seeds = torch.tensor([0.2, 0.5, 0.7, 0.4]), torch.tensor([3, 1, 4, 1], dtype=torch.int64)
    response = client.post("/v1/score", content=body(latents, embeds, pooled, u, seeds), headers=HEADERS)
    scores = response.json()["raw_scores"]
    targets = [
        expected(pipe, latents[i : i + 1], embeds[i : i + 1], pooled[i : i + 1], u[i].item(), int(seeds[i]))
        for i in range(4)
    ]
    assert scores == tolerances.close_to(targets)
    assert len(set(scores)) == 4


def test_any_prompt_length_and_fresh_noise_without_seeds(client, inputs):
    latents, embeds, pooled = inputs
    long = torch.cat([embeds[:1], torch.zeros(1, 333 - embeds.shape[1], embeds.shape[2])], dim=1)
    request = body(latents[:1], long, pooled[:1], torch.tensor([0.9]))
    first, second = (client.post("/v1/score", content=request, headers=HEADERS) for _ in range(2))
    assert first.status_code == second.status_code == 200
    assert first.json()["raw_scores"] != second.json()["raw_scores"]  # fresh noise per request at u = 0.9


def _bad_requests(inputs):
    latents, embeds, pooled = (x[:1] for x in inputs)
    u = torch.tensor([0.4])
    good = body(latents, embeds, pooled, u)
    return {
        "no protocol header": (good, {"content-type": "application/octet-stream"}, "protocol version"),
        "protocol version 2": (good, {**HEADERS, PROTOCOL_HEADER: "2"}, "protocol version"),
        "empty body": (b"", HEADERS, "empty body"),
        "malformed safetensors": (b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!", HEADERS, "not valid safetensors"),
        "truncated safetensors": (good[:-10], HEADERS, "not valid safetensors"),
        "missing u": (
            save({"latents": latents, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled}),
            HEADERS,
            "missing tensors",
        ),
        "unknown tensor": (body(latents, embeds, pooled, u, extra=torch.ones(1)), HEADERS, "unknown tensors"),
        "integer latents": (body(latents.long(), embeds, pooled, u), HEADERS, "dtype"),
        "float64 u": (body(latents, embeds, pooled, u.double()), HEADERS, "dtype"),
        "8 channels": (body(latents[:, :8], embeds, pooled, u), HEADERS, "latents must be"),
        "3D latents": (body(latents[0], embeds, pooled, u), HEADERS, "latents must be"),
        "2D prompt_embeds": (body(latents, embeds[0], pooled, u), HEADERS, "prompt_embeds must be"),
        "batch mismatch": (body(latents, embeds.repeat(2, 1, 1), pooled, u), HEADERS, "batch sizes differ"),
        "u of wrong length": (body(latents, embeds, pooled, torch.tensor([0.4, 0.5])), HEADERS, "u must be"),
        "NaN latents": (body(latents.clone().fill_(float("nan")), embeds, pooled, u), HEADERS, "NaN or infinite"),
        "Inf pooled": (body(latents, embeds, pooled.clone().fill_(float("inf")), u), HEADERS, "NaN or infinite"),
        "u above 1": (body(latents, embeds, pooled, torch.tensor([1.5])), HEADERS, "[0, 1]"),
        "int32 seeds": (body(latents, embeds, pooled, u, torch.tensor([1], dtype=torch.int32)), HEADERS, "seeds"),
    }


def test_bad_latent_requests_get_400_with_a_message(client, inputs):
    cases = _bad_requests(inputs)
    assert len(cases) >= 12
    for name, (content, headers, message) in cases.items():
        response = client.post("/v1/score", content=content, headers=headers)
        assert response.status_code == 400, (name, response.text)
        assert message in response.json()["error"], (name, response.json())


def test_oversize_body_gets_400(client, inputs):
    client.app.state.server.options.max_body_mb = 0.001
    latents, embeds, pooled = inputs
    response = client.post("/v1/score", content=body(latents, embeds, pooled, torch.tensor([0.4])), headers=HEADERS)
    assert response.status_code == 400 and "--max-body-mb" in response.json()["error"]


def test_503_while_loading_then_200(pipe, inputs):
    release = threading.Event()

    def slow_loader(options):
        release.wait(30)
        return pipe

    latents, embeds, pooled = (x[:1] for x in inputs)
    with TestClient(create_app(ServeOptions(model=TINY), loader=slow_loader)) as client:
        assert client.get("/healthz").status_code == 503
        response = client.post(
            "/v1/score", content=body(latents, embeds, pooled, torch.tensor([0.4])), headers=HEADERS
        )
        assert response.status_code == 503 and "loading" in response.json()["error"]
        release.set()
        wait_ready(client)
        response = client.post(
            "/v1/score", content=body(latents, embeds, pooled, torch.tensor([0.4])), headers=HEADERS
        )
        assert response.status_code == 200


def test_failed_load_answers_503_with_the_reason():
    def broken_loader(options):
        raise OSError("no such checkpoint")

    with TestClient(create_app(ServeOptions(model="missing"), loader=broken_loader)) as client:
        for _ in range(200):
            response = client.get("/healthz")
            if "failed" in response.json()["error"]:
                break
            time.sleep(0.01)
        assert response.status_code == 503 and "no such checkpoint" in response.json()["error"]


async def _gather_scores(app, requests: list[bytes]) -> list[httpx.Response]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            while (await client.get("/healthz")).status_code != 200:
                await asyncio.sleep(0.01)
            return await asyncio.gather(*(client.post("/v1/score", content=r, headers=HEADERS) for r in requests))


@pytest.fixture
def counted(pipe, monkeypatch):
    """Counts the batched model calls (`reward_model.score_latents`) and their batch sizes."""
    sizes = []
    score_latents = pipe.reward_model.score_latents

    def counting(latents, *args, **kwargs):
        sizes.append(latents.shape[0])
        return score_latents(latents, *args, **kwargs)

    monkeypatch.setattr(pipe.reward_model, "score_latents", counting)
    return sizes


def test_concurrent_requests_share_batched_calls_with_identical_scores(pipe, inputs, counted):
    """16 concurrent requests (twice --max_batch_size) with two prompt lengths, four latents and five levels:
    enough to show batching, the shape split and per-request noise; each is rechecked against a single call."""
    latents, embeds, pooled = inputs
    n = 16
    # two prompt lengths: only same-shaped requests may share a call
    long = torch.cat([embeds, torch.zeros(4, 5, embeds.shape[2])], dim=1)
    samples = [(i % 4, (embeds if i % 3 else long), 0.1 + 0.8 * (i % 5) / 4, 1000 + i) for i in range(n)]
    requests = [
        body(latents[j : j + 1], e[j : j + 1], pooled[j : j + 1], torch.tensor([u]), torch.tensor([seed]))
        for j, e, u, seed in samples
    ]
    app = create_app(ServeOptions(model=TINY, max_batch_size=8, max_wait_ms=50), loader=lambda options: pipe)
    responses = asyncio.run(_gather_scores(app, requests))
    assert all(response.status_code == 200 for response in responses)
    calls = list(counted)
    assert sum(calls) == n and len(calls) < n and max(calls) <= 8 and max(calls) > 1
    counted.clear()
    for (j, e, u, seed), response in zip(samples, responses):
        target = expected(pipe, latents[j : j + 1], e[j : j + 1], pooled[j : j + 1], torch.tensor(u).item(), seed)
        # batched passes round differently from single ones: 1e-5, relative to the tiny model's large scores
        assert response.json()["raw_scores"][0] == tolerances.close_to(target)


def test_max_batch_size_1_runs_every_request_alone(pipe, inputs, counted):
    latents, embeds, pooled = (x[:1] for x in inputs)
    requests = [body(latents, embeds, pooled, torch.tensor([0.4]), torch.tensor([i])) for i in range(8)]
    app = create_app(ServeOptions(model=TINY, max_batch_size=1, max_wait_ms=50), loader=lambda options: pipe)
    responses = asyncio.run(_gather_scores(app, requests))
    assert all(response.status_code == 200 for response in responses)
    assert counted == [1] * 8


@pytest.fixture
def slow_model(pipe, monkeypatch):
    score_latents = pipe.reward_model.score_latents

    def slow(*args, **kwargs):
        time.sleep(1.5)
        return score_latents(*args, **kwargs)

    monkeypatch.setattr(pipe.reward_model, "score_latents", slow)


def test_request_past_its_deadline_gets_503_not_a_hang(pipe, inputs, slow_model):
    latents, embeds, pooled = (x[:1] for x in inputs)
    app = create_app(ServeOptions(model=TINY, request_timeout_s=0.3), loader=lambda options: pipe)
    with TestClient(app) as client:
        wait_ready(client)
        start = time.monotonic()
        response = client.post(
            "/v1/score", content=body(latents, embeds, pooled, torch.tensor([0.4])), headers=HEADERS
        )
        assert time.monotonic() - start < 1.4
        assert response.status_code == 503 and "deadline" in response.json()["error"]


def test_full_queue_gets_503(pipe, inputs, slow_model):
    latents, embeds, pooled = (x[:1] for x in inputs)
    app = create_app(ServeOptions(model=TINY, max_queue=1, max_wait_ms=0), loader=lambda options: pipe)
    responses = asyncio.run(_gather_scores(app, [body(latents, embeds, pooled, torch.tensor([0.4]))] * 2))
    assert sorted(response.status_code for response in responses) == [200, 503]
    assert any("queue is full" in response.text for response in responses)


def test_inference_failure_gets_500(client, pipe, inputs, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(pipe.reward_model, "score_latents", broken)
    latents, embeds, pooled = (x[:1] for x in inputs)
    response = client.post("/v1/score", content=body(latents, embeds, pooled, torch.tensor([0.4])), headers=HEADERS)
    assert response.status_code == 500 and "device-side assert" in response.json()["error"]


def _png(color, size=(40, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_endpoint_json_and_multipart_equal_the_pipeline(client, pipe):
    images = [_png("red"), _png("blue")]
    prompts = ["a red circle", "a blue square"]
    pil = [Image.open(io.BytesIO(data)) for data in images]
    target = pipe(prompts, images=pil, t=0.3, generator=torch.Generator().manual_seed(5)).rewards.tolist()
    payload = {"images": [base64.b64encode(data).decode() for data in images], "prompts": prompts, "t": 0.3, "seed": 5}
    as_json = client.post("/v1/score_images", json=payload)
    as_form = client.post(
        "/v1/score_images",
        files=[("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)],
        data={"prompts": prompts, "t": "0.3", "seed": "5"},
    )
    for response in (as_json, as_form):
        assert response.status_code == 200, response.text
        assert response.json()["raw_scores"] == tolerances.close_to(target)


def test_bad_image_requests_get_400(client):
    good = base64.b64encode(_png("red")).decode()
    cases = [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "not valid JSON"),
        ({"json": {"images": ["@@@"], "prompts": ["x"]}}, "base64"),
        ({"json": {"images": [base64.b64encode(b"text").decode()], "prompts": ["x"]}}, "PNG/JPEG"),
        ({"json": {"images": [good, good], "prompts": ["a", "b", "c"]}}, "3 prompts for 2 images"),
        ({"json": {"images": [good], "prompts": [""]}}, "prompts"),
        ({"json": {"images": [good], "prompts": ["x"], "t": 2}}, "[0, 1]"),
        ({"content": b"x", "headers": {"content-type": "text/plain"}}, "not supported"),
    ]
    for kwargs, message in cases:
        response = client.post("/v1/score_images", **kwargs)
        assert response.status_code == 400 and message in response.json()["error"], (kwargs, response.text)


def test_recipe_option_spellings():
    recipe = "--model-path a --base-model-path b --dtype float32 --max-batch-size 8 --max-wait-ms 10 --port 8000"
    args = build_parser().parse_args(recipe.split())
    assert (args.model, args.base_model, args.dtype, args.max_batch_size, args.max_wait_ms, args.port) == (
        "a",
        "b",
        "float32",
        8,
        10.0,
        8000,
    )
    assert build_parser().parse_args(["--model", "a", "--base-model", "b"]).base_model == "b"
    assert 'dinalrm-serve = "dinalrm.cli:serve_main"' in (REPO_ROOT / "pyproject.toml").read_text()


# ------------------------------------------------------------------------------------------ over real HTTP
@pytest.fixture(scope="module")
def server_url(warm_python):
    """The real `dinalrm-serve` entry point in a subprocess on a free port (the recipe's option spellings)."""
    port = free_port()
    command = [warm_python, "-c", "from dinalrm.cli import serve_main; serve_main()"]
    command += ["--model-path", TINY, "--dtype", "float32", "--max-batch-size", "8", "--max-wait-ms", "10"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*command, "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stdout.read().decode()
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.slow  # starts the server in a new process: ~20 s on a shared 2-core machine
def test_real_server_process_answers_healthz_and_score(server_url, pipe, inputs):
    latents, embeds, pooled = (x[:1] for x in inputs)
    assert httpx.get(f"{server_url}/healthz").json()["status"] == "ok"
    response = httpx.post(
        f"{server_url}/v1/score",
        content=body(latents, embeds, pooled, torch.tensor([0.4]), torch.tensor([11])),
        headers=HEADERS,
    )
    assert response.status_code == 200
    target = expected(pipe, latents, embeds, pooled, torch.tensor(0.4).item(), 11)
    assert response.json()["raw_scores"][0] == tolerances.close_to(target)


# ------------------------------------------------------------------------------------------ verl-omni's client
async def verl_omni_compute_score(
    http: httpx.AsyncClient,
    server_url: str,
    extra_info: dict,
    noise_level: float = 0.4,
    noise_seed: int | None = 0,
    score_scale: float = 1.0,
    score_bias: float = 0.0,
    max_retries: int = 2,
    retry_backoff: float = 0.5,
) -> tuple[dict, int]:
    """verl-omni's `verl_omni/utils/reward_score/latent_http_scorer_client.py` `compute_score`, re-implemented from
    its documented behaviour: one sample per request as safetensors (`latents`, `prompt_embeds`,
    `pooled_prompt_embeds`, float32 `u` [1], int64 `seeds` [1] unless `noise_seed` is None), protocol header 1; any
    non-200 status, non-JSON body, wrong protocol version, not exactly one raw score or a non-finite one is an error,
    retried `max_retries` times after `retry_backoff * 2**attempt` seconds. Returns the result and the attempts."""
    tensors = {
        "latents": extra_info["latents_clean"].unsqueeze(0).contiguous(),
        "prompt_embeds": extra_info["prompt_embeds"].unsqueeze(0).contiguous(),
        "pooled_prompt_embeds": extra_info["pooled_prompt_embeds"].unsqueeze(0).contiguous(),
        "u": torch.tensor([noise_level], dtype=torch.float32),
    }
    if noise_seed is not None:
        tensors["seeds"] = torch.tensor([noise_seed], dtype=torch.int64)
    payload = save(tensors)
    headers = {"content-type": "application/octet-stream", "x-drm-protocol-version": "1"}
    last_error = None
    for attempt in range(max_retries + 1):
        try:
            response = await http.post(server_url, content=payload, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"DRM server returned HTTP {response.status_code}: {response.text}")
            result = response.json()
            if not isinstance(result, dict) or result.get("protocol_version") != "1":
                raise RuntimeError(f"DRM protocol mismatch: {result!r}")
            raw_scores = result.get("raw_scores")
            if (
                not isinstance(raw_scores, list)
                or len(raw_scores) != 1
                or not torch.isfinite(torch.tensor(raw_scores[0]))
            ):
                raise RuntimeError(f"DRM server must return one finite raw score, got {raw_scores!r}")
            raw = float(raw_scores[0])
            return {"score": raw * score_scale + score_bias, "drm_raw_score": raw}, attempt + 1
        except (httpx.HTTPError, RuntimeError, ValueError) as error:
            last_error = error
            if attempt < max_retries:
                await asyncio.sleep(retry_backoff * (2**attempt))
    raise RuntimeError(f"DRM scoring failed after {max_retries + 1} attempts: {last_error}") from last_error


def _extra_info(inputs, i: int) -> dict:
    latents, embeds, pooled = inputs
    return {"latents_clean": latents[i], "prompt_embeds": embeds[i], "pooled_prompt_embeds": pooled[i]}


@pytest.mark.slow  # the same server process (a fresh interpreter): outside the quick tier with the test above
def test_verl_omni_client_against_the_real_server(server_url, pipe, inputs):
    """The recipe's reward config (`score_scale=0.1`, `score_bias=1.0`) over real HTTP, with and without seeds."""

    async def run():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(
                *(
                    verl_omni_compute_score(
                        http,
                        f"{server_url}/v1/score",
                        _extra_info(inputs, i),
                        noise_seed=i,
                        score_scale=0.1,
                        score_bias=1.0,
                    )
                    for i in range(4)
                ),
                verl_omni_compute_score(http, f"{server_url}/v1/score", _extra_info(inputs, 0), noise_seed=None),
            )

    results = asyncio.run(run())
    latents, embeds, pooled = inputs
    for i, (result, attempts) in enumerate(results[:4]):
        target = expected(pipe, latents[i : i + 1], embeds[i : i + 1], pooled[i : i + 1], torch.tensor(0.4).item(), i)
        assert attempts == 1
        assert result["drm_raw_score"] == tolerances.close_to(target)
        assert result["score"] == tolerances.close_to(target * 0.1 + 1.0, scale=abs(target) * 0.1 + 1.0)
    assert results[4][1] == 1 and torch.isfinite(torch.tensor(results[4][0]["drm_raw_score"]))


def test_verl_omni_client_retries_through_loading(pipe, inputs):
    """The client's retries carry it over the 503s of a server still loading: the third attempt scores."""
    release = threading.Event()
    attempts_seen = []

    def slow_loader(options):
        release.wait(30)
        return pipe

    app = create_app(ServeOptions(model=TINY), loader=slow_loader)

    @app.middleware("http")
    async def open_after_two_attempts(request, call_next):
        if request.url.path == "/v1/score":
            attempts_seen.append(time.monotonic())
            if len(attempts_seen) == 2:
                release.set()
                while app.state.server.reward_model is None:
                    await asyncio.sleep(0.01)
                return JSONResponse({"error": "simulated overload"}, status_code=503)
        return await call_next(request)

    async def run():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
                return await verl_omni_compute_score(
                    http, "http://test/v1/score", _extra_info(inputs, 1), retry_backoff=0.05
                )

    result, attempts = asyncio.run(run())
    assert attempts == 3
    assert attempts_seen[1] - attempts_seen[0] >= 0.05 and attempts_seen[2] - attempts_seen[1] >= 0.1
    latents, embeds, pooled = inputs
    target = expected(pipe, latents[1:2], embeds[1:2], pooled[1:2], torch.tensor(0.4).item(), 0)
    assert result["drm_raw_score"] == tolerances.close_to(target)


def test_verl_omni_client_gives_up_after_its_retries(client, inputs):
    """A request the server refuses (400) stays refused: the client fails after 1 + max_retries attempts."""

    async def run():
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            info = _extra_info(inputs, 0)
            info["latents_clean"] = info["latents_clean"][:8]  # 8 channels: refused
            await verl_omni_compute_score(http, "http://test/v1/score", info, retry_backoff=0.01)

    with pytest.raises(RuntimeError, match=r"failed after 3 attempts: DRM server returned HTTP 400"):
        asyncio.run(run())


def test_latents_only_loads_the_reward_model_alone(pipe, inputs):
    """`--latents-only` loads no VAE or text encoder; latent scores are unchanged and images are refused."""
    latents, embeds, pooled = (x[:1] for x in inputs)
    with TestClient(create_app(ServeOptions(model=TINY, latents_only=True))) as client:
        wait_ready(client)
        assert not hasattr(client.app.state.server.reward_model, "vae") and client.app.state.server.pipe is None
        response = client.post(
            "/v1/score", content=body(latents, embeds, pooled, torch.tensor([0.4]), torch.tensor([3])), headers=HEADERS
        )
        target = expected(pipe, latents, embeds, pooled, torch.tensor(0.4).item(), 3)
        assert response.json()["raw_scores"][0] == tolerances.close_to(target)
        images = client.post(
            "/v1/score_images", json={"images": [base64.b64encode(_png("red")).decode()], "prompts": "x"}
        )
        assert images.status_code == 400 and "--latents-only" in images.json()["error"]
