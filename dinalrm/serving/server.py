"""`dinalrm-serve`: an HTTP reward server for distributed RL (verl-omni's latent scorer protocol, version 1).

`POST /v1/score` scores clean SD3 latents sent as safetensors; `POST /v1/score_images` scores images with their
prompts; `GET /healthz` answers 200 once the model is loaded. Concurrent requests are micro-batched by one worker
(`ScoreBatcher`): requests whose tensors have the same shapes and dtypes share a backbone pass, and every sample
keeps its own noise, drawn exactly as `DiNaLRMPipeline.__call__` draws it from `torch.Generator().manual_seed(seed)`,
so a batched score equals the unbatched pipeline call up to float rounding: a batched pass rounds differently from a
single one (measured: up to about 1e-6 relative on float32), so the same seed gives the same score within that, not bit for
bit, when other requests share its batch.

The server bounds what one request can cost: prompt tokens (`--max-prompt-tokens`), image pixels
(`pipeline_dinalrm.MAX_IMAGE_PIXELS`, the Space's cap) and images per request; images are decoded off the event loop;
a request larger than `--max-batch-size` runs chunk by chunk with other clients' requests served between its chunks,
and is dropped between chunks once past its deadline. Client mistakes get a JSON 400, results that are not finite a
JSON 422 naming the sample; 500 is kept for genuine inference failures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import json
import math
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch
from diffusers.utils import logging as diffusers_logging
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from starlette.exceptions import HTTPException

from .arguments import DTYPE_NAMES, build_parser  # noqa: F401  (build_parser: its home is the light arguments module)


logger = diffusers_logging.get_logger(__name__)

PROTOCOL_VERSION = "1"
PROTOCOL_HEADER = "x-drm-protocol-version"
LATENT_TENSORS = ("latents", "prompt_embeds", "pooled_prompt_embeds", "u")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# The prompt tokens an SD3 text stream takes: CLIP's 77 plus T5's most, 512 (StableDiffusion3Pipeline refuses more).
CLIP_TOKENS, T5_MAX_TOKENS = 77, 512
# Seeds are drawn as 63-bit integers; torch.Generator.manual_seed refuses more than 64 bits.
MAX_SEED = 2**63 - 1


class RequestError(ValueError):
    """A request the server answers with an error; `status` is its HTTP status (400 for bad input, 503 for
    overload, 500 for a genuine inference failure)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ServeOptions:
    """What `dinalrm-serve` loads and how it batches (the command-line options, as one object).

    Args:
        model (`str`): DiNa-LRM Hub id or folder (pipeline repository or official checkpoint).
        base_model (`str`, *optional*): SD3.5-Medium Hub id or folder, for official checkpoints.
        dtype (`str`): `"float32"` or `"bfloat16"`.
        device (`str`, *optional*): defaults to `"cuda"` when available, else `"cpu"`.
        max_batch_size (`int`): samples per batched model call.
        max_wait_ms (`float`): how long the first request of a batch waits for others.
        max_queue (`int`): requests waiting or running before new ones get 503.
        max_body_mb (`float`): largest request body accepted.
        request_timeout_s (`float`): per-request deadline; a request past it gets 503.
        latents_only (`bool`): load only the reward model (no VAE, text encoders); `/v1/score_images` then answers
            400.
        normalize (`str`, *optional*): `"zscore"` returns `(raw - mean) / std` from the model's reward statistics
            at each sample's noise level (`eval/reward_stats.py`); default: raw rewards.
        max_prompt_tokens (`int`, *optional*): longest `prompt_embeds` accepted; defaults to the model's text limit,
            `77 + max(512, config.max_sequence_length)` tokens.
        max_images (`int`): images per `/v1/score_images` request.
    """

    model: str
    base_model: str | None = None
    dtype: str = "float32"
    device: str | None = None
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 1024
    max_body_mb: float = 256.0
    request_timeout_s: float = 120.0
    latents_only: bool = False
    normalize: str | None = None
    max_prompt_tokens: int | None = None
    max_images: int = 64


def prompt_token_limit(reward_model, options: ServeOptions) -> int:
    """The longest `prompt_embeds` a request may send: `--max-prompt-tokens`, else the model's text limit (CLIP's
    77 tokens plus T5's 512, or the trained `max_sequence_length` if longer)."""
    if options.max_prompt_tokens is not None:
        return options.max_prompt_tokens
    return CLIP_TOKENS + max(T5_MAX_TOKENS, reward_model.config.max_sequence_length)


def check_latent_shapes(reward_model, request: dict[str, torch.Tensor], max_tokens: int) -> None:
    """Refuses (400) a parsed latent request the model cannot take: the model's own shape checks (latent sides,
    patch size, embedding widths) and prompts longer than `max_tokens`."""
    tokens = request["prompt_embeds"].shape[1]
    if tokens > max_tokens:
        raise RequestError(
            f"prompt_embeds hold {tokens} tokens, more than this server takes ({max_tokens}): send the text encoders' "
            "output at its usual length, or start the server with a larger --max-prompt-tokens."
        )
    try:
        reward_model.check_inputs(
            request["latents"], request["prompt_embeds"], request["pooled_prompt_embeds"], check_finite=False
        )
    except (ValueError, TypeError) as error:
        raise RequestError(str(error)) from None


def load_pipeline(options: ServeOptions):
    """What `options` name, on its device: the pipeline through `DiNaLRMPipeline.from_pretrained` (official
    checkpoints by Hub id included), or with `latents_only` the reward model alone (`DiNaLRMModel.from_pretrained`:
    a pipeline repository's `reward_model/`, or an official checkpoint on `base_model`)."""
    from modeling_dinalrm import DiNaLRMModel, resolve_repo
    from pipeline_dinalrm import DiNaLRMPipeline

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[options.dtype]
    if options.latents_only:
        patterns = ["config.json", "model_index.json", "reward_model/config.json"]
        folder, _ = resolve_repo(options.model, patterns, "DiNa-LRM model")
        if os.path.isfile(os.path.join(folder, "reward_model", "config.json")):
            model = DiNaLRMModel.from_pretrained(folder, subfolder="reward_model", dtype=dtype)
        else:
            model = DiNaLRMModel.from_pretrained(options.model, base_model=options.base_model, dtype=dtype)
        return model.eval().to(device)
    pipe = DiNaLRMPipeline.from_pretrained(options.model, base_model=options.base_model, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ------------------------------------------------------------------------------------------ latent requests
def parse_latent_request(body: bytes, version: str | None, channels: int) -> dict[str, torch.Tensor]:
    """The checked tensors of a `/v1/score` body; raises `RequestError` naming what is wrong and the fix."""
    if version != PROTOCOL_VERSION:
        raise RequestError(
            f"unsupported protocol version {version!r} in header {PROTOCOL_HEADER}: this server speaks version "
            f"{PROTOCOL_VERSION!r}; send `{PROTOCOL_HEADER}: {PROTOCOL_VERSION}`."
        )
    if not body:
        raise RequestError("empty body: send safetensors bytes with latents, prompt_embeds, pooled_prompt_embeds, u.")
    try:
        tensors = load_tensors(body)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise RequestError(
            f"the body is not valid safetensors ({error}); serialise with safetensors.torch.save."
        ) from None
    missing = [name for name in LATENT_TENSORS if name not in tensors]
    if missing:
        raise RequestError(f"missing tensors {missing}: the body needs {list(LATENT_TENSORS)} (and optional seeds).")
    unknown = sorted(set(tensors) - set(LATENT_TENSORS) - {"seeds"})
    if unknown:
        raise RequestError(f"unknown tensors {unknown}: send only {list(LATENT_TENSORS)} and optional seeds.")
    latents, embeds, pooled, u = (tensors[name] for name in LATENT_TENSORS)
    for name in ("latents", "prompt_embeds", "pooled_prompt_embeds", "u"):
        if tensors[name].dtype not in FLOAT_DTYPES:
            raise RequestError(f"{name} has dtype {tensors[name].dtype}: send float32, bfloat16 or float16.")
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise RequestError(f"latents must be [B, {channels}, h, w] scaled SD3 latents, got {list(latents.shape)}.")
    if embeds.ndim != 3 or pooled.ndim != 2:
        raise RequestError(
            f"prompt_embeds must be [B, L, D] and pooled_prompt_embeds [B, P], got {list(embeds.shape)} and "
            f"{list(pooled.shape)}."
        )
    batch = latents.shape[0]
    if batch == 0:
        raise RequestError("latents hold no sample (B = 0): send at least one.")
    if embeds.shape[0] != batch or pooled.shape[0] != batch:
        raise RequestError(
            f"batch sizes differ: latents {batch}, prompt_embeds {embeds.shape[0]}, pooled_prompt_embeds "
            f"{pooled.shape[0]}; send one prompt row per latent."
        )
    if u.ndim != 1 or u.shape[0] not in (1, batch):
        raise RequestError(f"u must be [1] or [B] = [{batch}] noise levels, got {list(u.shape)}.")
    for name in ("latents", "prompt_embeds", "pooled_prompt_embeds", "u"):
        if not torch.isfinite(tensors[name]).all():
            raise RequestError(f"{name} contains NaN or infinite values.")
    if ((u < 0) | (u > 1)).any():
        raise RequestError(f"u is the noise level and must lie in [0, 1], got {u.tolist()}.")
    seeds = tensors.get("seeds")
    if seeds is not None and (seeds.dtype != torch.int64 or seeds.shape != (batch,)):
        raise RequestError(f"seeds must be int64 [B] = [{batch}], got {seeds.dtype} {list(seeds.shape)}.")
    tensors["u"] = u.float().expand(batch)
    return tensors


def slice_latent_request(request: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Samples `start:stop` of a parsed latent request (seeds included), to score a large request in chunks."""
    return {name: value[start:stop] for name, value in request.items()}


def seeded_noise(reward_model, latent: torch.Tensor, seed: int) -> torch.Tensor:
    """The noise `DiNaLRMPipeline.__call__` gives one latent `[1, C, h, w]` scored alone with
    `generator=torch.Generator().manual_seed(seed)` (its prompt-shared draw, cropped to the latent's size)."""
    from pipeline_dinalrm import DiNaLRMPipeline, prompt_shared_noises

    side = DiNaLRMPipeline.max_latent_side_for(reward_model)
    generator = torch.Generator().manual_seed(seed)
    return prompt_shared_noises({}, [0], [([0], latent)], 1, generator, side)[0][0]


def score_latent_batch(reward_model, requests: list[dict[str, torch.Tensor]]) -> list[list[float]]:
    """Raw rewards of same-shaped latent requests in ONE `score_latents` call, split back per request.

    Each sample is noised with its own seed (a fresh random one without `seeds`) at its own level `u`.
    """
    device = reward_model.device
    latents = torch.cat([request["latents"] for request in requests]).to(device)
    embeds = torch.cat([request["prompt_embeds"] for request in requests]).to(device)
    pooled = torch.cat([request["pooled_prompt_embeds"] for request in requests]).to(device)
    levels = torch.cat([request["u"] for request in requests]).to(device)
    seeds = [
        int(seed)
        for request in requests
        for seed in (request["seeds"] if "seeds" in request else [secrets.randbits(63)] * request["latents"].shape[0])
    ]
    noise = torch.cat([seeded_noise(reward_model, latents[i : i + 1], seed) for i, seed in enumerate(seeds)])
    with torch.no_grad():
        rewards = reward_model.score_latents(latents, embeds, pooled, t=levels, noise=noise, check_finite=False)
    rewards = rewards.float().cpu().tolist()
    sizes = [request["latents"].shape[0] for request in requests]
    return [rewards[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes))]


def latent_batch_key(request: dict[str, torch.Tensor]) -> tuple:
    """Requests with equal keys can share one model call (same shapes and dtypes after the batch dimension)."""
    return tuple((name, tuple(request[name].shape[1:]), request[name].dtype) for name in LATENT_TENSORS[:3])


# ------------------------------------------------------------------------------------------ image requests
def _decode_image(data: bytes, where: str):
    """The decoded image, refused (400) when unreadable or above `MAX_IMAGE_PIXELS` (checked on the header, before
    the pixels are decoded). Blocking: call it off the event loop."""
    from PIL import Image, UnidentifiedImageError

    from pipeline_dinalrm import MAX_IMAGE_PIXELS

    unreadable = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
    try:
        image = Image.open(io.BytesIO(data))
    except unreadable as error:
        raise RequestError(f"{where} is not a readable PNG/JPEG image ({type(error).__name__}: {error}).") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise RequestError(
            f"{where} is {width}x{height} = {width * height / 1e6:.1f} megapixels; the limit is "
            f"{MAX_IMAGE_PIXELS / 1e6:.1f}: downscale it (it is resized to about 1 megapixel anyway)."
        )
    if width == 0 or height == 0:
        raise RequestError(f"{where} is empty ({width}x{height} pixels).")
    try:
        image.load()
    except unreadable as error:
        raise RequestError(f"{where} is not a readable PNG/JPEG image ({type(error).__name__}: {error}).") from None
    return image


def parse_image_json(payload, max_images: int = 64) -> tuple[list, list[str], dict]:
    """Images, prompts and options of a JSON `/v1/score_images` body (`images`: base64 PNG/JPEG strings).
    Decodes the images: call it off the event loop."""
    if not isinstance(payload, dict):
        raise RequestError('the JSON body must be an object {"images": [base64, ...], "prompts": [...]}.')
    images, prompts = payload.get("images"), payload.get("prompts", payload.get("prompt"))
    if not isinstance(images, list) or not images or not all(isinstance(item, str) for item in images):
        raise RequestError('"images" must be a non-empty list of base64-encoded PNG/JPEG strings.')
    if len(images) > max_images:
        raise RequestError(
            f"{len(images)} images in one request; send at most {max_images} (--max-images) per request."
        )
    decoded = []
    for index, item in enumerate(images):
        try:
            data = base64.b64decode(item.split(",", 1)[-1], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"images[{index}] is not valid base64.") from None
        decoded.append(_decode_image(data, f"images[{index}]"))
    return decoded, prompts, {key: payload[key] for key in ("t", "seed") if key in payload}


def check_image_request(images: list, prompts, options: dict) -> tuple[list[str], dict]:
    """Checked prompts (one per image) and options (`t` in [0, 1], integer `seed`) of an image request."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise RequestError('"prompts" must be one non-empty prompt or one per image.')
    if len(prompts) not in (1, len(images)):
        raise RequestError(f"{len(prompts)} prompts for {len(images)} images: send one prompt or one per image.")
    t = options.get("t")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1):
        raise RequestError(f'"t" must be a noise level in [0, 1], got {t!r}.')
    seed = options.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise RequestError(f'"seed" must be an integer in [0, 2**63 - 1], got {seed!r}.')
    return prompts * (len(images) // len(prompts)), options


def score_image_request(pipe, images: list, prompts: list[str], options: dict) -> list[float]:
    """Raw rewards of images through the pipeline (`t` and `seed` as `pipe(..., t=t, generator=seed)`)."""
    seed = options.get("seed")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return pipe(prompts, images=images, t=options.get("t"), generator=generator).rewards.tolist()


# ------------------------------------------------------------------------------------------ batching
@dataclass(eq=False)  # jobs are compared by identity
class _Job:
    key: tuple
    payload: object
    size: int
    future: asyncio.Future
    cancelled: bool = False
    enqueued: float = field(default_factory=time.monotonic)
    results: list = field(default_factory=list)


class ScoreBatcher:
    """Micro-batches concurrent requests: one worker collects jobs for up to `max_wait_ms` or `max_batch_size`
    samples, groups the jobs with equal keys and runs each group as one call on the model's thread (always the same
    one: a fresh thread per call would start another OpenMP team on the CPU, whose idle spinning slows the next).

    A job of more than `max_batch_size` samples (with `split`) runs one chunk per call, and the jobs that arrived
    meanwhile run between its chunks, so a large request delays the others by one chunk at most; once it is past its
    deadline its remaining chunks are dropped. Results that are not finite fail their job with a 422 naming the
    sample.

    Args:
        run_group (`Callable[[tuple, list], list]`): scores a group of payloads sharing a key; returns one result per
            payload.
        max_batch_size (`int`): samples per group call (a larger single request runs alone).
        max_wait_ms (`float`): how long the first job of a batch waits for more.
        max_queue (`int`): jobs waiting or running before `submit` refuses with 503.
        timeout_s (`float`): per-request deadline; a job past it gets 503 (and is skipped if not started).
        split (`Callable[[object, int, int], object]`, *optional*): samples `start:stop` of a payload; without it,
            every job runs whole.
    """

    def __init__(
        self,
        run_group: Callable,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        timeout_s: float,
        split: Callable | None = None,
    ):
        self.run_group = run_group
        self.split = split
        self.large: list[_Job] = []
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.pending = 0
        self.worker: asyncio.Task | None = None
        self.executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dinalrm-model")
        self.worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            try:
                await self.worker
            except asyncio.CancelledError:
                pass
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, key: tuple, payload: object, size: int):
        """The result of `payload`, scored in a batch of jobs with the same key; raises `RequestError` (503) when the
        queue is full or the deadline passes."""
        if self.pending >= self.max_queue:
            raise RequestError(
                f"the queue is full ({self.max_queue} requests): retry later or raise --max-queue.", 503
            )
        job = _Job(key, payload, size, asyncio.get_running_loop().create_future())
        self.pending += 1
        self.queue.put_nowait(job)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise RequestError(
                f"the request passed its deadline of {self.timeout_s:g} s: retry, or raise --request-timeout-s.", 503
            ) from None
        finally:
            self.pending -= 1

    async def _collect(self) -> list[_Job]:
        if self.large and self.queue.empty():  # a large job is in progress: do not wait for company
            return []
        jobs = [await self.queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while sum(job.size for job in jobs) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        while not self.queue.empty() and sum(job.size for job in jobs) < self.max_batch_size:
            jobs.append(self.queue.get_nowait())
        return jobs

    def _groups(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Jobs split by key, then into chunks of at most `max_batch_size` samples (in arrival order)."""
        by_key: dict[tuple, list[list[_Job]]] = {}
        for job in jobs:
            chunks = by_key.setdefault(job.key, [[]])
            if chunks[-1] and sum(j.size for j in chunks[-1]) + job.size > self.max_batch_size:
                chunks.append([])
            chunks[-1].append(job)
        return [chunk for chunks in by_key.values() for chunk in chunks]

    async def _work(self) -> None:
        while True:
            jobs = await self._collect()
            for job in jobs:
                if self.split is not None and job.size > self.max_batch_size:
                    self.large.append(job)
            small = [job for job in jobs if job not in self.large]
            for group in self._groups(small):
                group = [job for job in group if not job.cancelled and not job.future.done()]
                results = await self._run(group, [job.payload for job in group])
                for job, result in zip(group, results or []):
                    self._finish(job, result)
            if self.large:
                await self._next_chunk(self.large[0])

    async def _next_chunk(self, job: _Job) -> None:
        """Scores the next `max_batch_size` samples of a large job (dropped once cancelled or failed)."""
        start = len(job.results)
        if not job.cancelled and not job.future.done():
            stop = min(start + self.max_batch_size, job.size)
            results = await self._run([job], [self.split(job.payload, start, stop)])
            if results is not None:
                job.results.extend(results[0])
                if len(job.results) == job.size:
                    self._finish(job, job.results)
        if job.cancelled or job.future.done():
            self.large.remove(job)

    async def _run(self, group: list[_Job], payloads: list) -> list | None:
        """One model call for `group`; on failure its jobs get the error (400 for bad input, 500 otherwise)."""
        if not group:
            return None
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.executor, self.run_group, group[0].key, payloads
            )
        except Exception as error:
            if isinstance(error, RequestError):
                failure = error
            elif isinstance(error, (ValueError, TypeError)):  # the model's own input checks
                failure = RequestError(f"the model cannot score this request: {error}")
            else:  # a genuine inference failure: 500 for the group's requests
                logger.exception("scoring failed")
                failure = RequestError(f"inference failed: {type(error).__name__}: {error}", 500)
            for job in group:
                if not job.future.done():
                    job.future.set_exception(failure)
            return None

    @staticmethod
    def _finish(job: _Job, result: list[float]) -> None:
        if job.future.done():
            return
        bad = [index for index, value in enumerate(result) if not math.isfinite(value)]
        if bad:
            job.future.set_exception(
                RequestError(
                    f"sample(s) {bad[:8]} of this request scored {result[bad[0]]} (not finite): the inputs are out of "
                    "the range the model works in (e.g. latents far from unit scale), or the model's weights are "
                    "broken. The other samples were not returned; send finite, VAE-scaled latents.",
                    422,
                )
            )
        else:
            job.future.set_result(result)


# ------------------------------------------------------------------------------------------ the app
class RewardServer:
    """The model and the batcher behind the app: loads with `loader` in a thread, then scores through the batcher.

    Args:
        options ([`ServeOptions`]): what to load and how to batch.
        loader (`Callable[[ServeOptions], DiNaLRMPipeline | DiNaLRMModel]`, *optional*): builds the pipeline, or
            the reward model alone, which serves only latents (default `load_pipeline`); tests pass a tiny one.
    """

    def __init__(self, options: ServeOptions, loader: Callable | None = None):
        self.options = options
        self.loader = loader or load_pipeline
        self.pipe = None
        self.reward_model = None
        self.load_error: BaseException | None = None
        self.batcher = ScoreBatcher(
            self._run_group,
            options.max_batch_size,
            options.max_wait_ms,
            options.max_queue,
            options.request_timeout_s,
            split=slice_latent_request,
        )

    async def load(self) -> None:
        try:
            loaded = await asyncio.to_thread(self.loader, self.options)
        except Exception as error:
            self.load_error = error
            logger.exception(f"loading {self.options.model} failed")
            return
        pipe = loaded if hasattr(loaded, "reward_model") else None
        reward_model = loaded.reward_model if pipe is not None else loaded
        if self.options.normalize == "zscore" and not reward_model.config.reward_statistics:
            self.load_error = ValueError(
                "--normalize zscore needs reward statistics in the model config: compute them with "
                "`python eval/reward_stats.py --model <folder> --pairs <reference pairs> --write_to_model`."
            )
            logger.error(str(self.load_error))
            return
        self.pipe, self.reward_model = pipe, reward_model
        logger.info(f"{self.options.model} loaded; serving")

    def ready(self) -> None:
        """Raises a 503 `RequestError` unless the model is loaded."""
        if self.reward_model is None:
            if self.load_error is not None:
                raise RequestError(f"the model failed to load: {self.load_error}", 503)
            raise RequestError("the model is still loading: retry when GET /healthz answers 200.", 503)

    def _run_group(self, key: tuple, payloads: list):
        if key[0] == "images":
            images, prompts, options = payloads[0]
            rewards = score_image_request(self.pipe, images, prompts, options)
            levels = options.get("t") or self.reward_model.config.default_t
            return [self._normalize(rewards, [levels] * len(rewards))]
        results = score_latent_batch(self.reward_model, payloads)
        return [self._normalize(rewards, request["u"].tolist()) for rewards, request in zip(results, payloads)]

    def _normalize(self, rewards: list[float], levels: list) -> list[float]:
        """Raw rewards, or z-scores from the reward statistics at each sample's noise level(s)."""
        if self.options.normalize != "zscore":
            return rewards
        try:
            return [float(self.reward_model.zscore(torch.tensor(r), t)) for r, t in zip(rewards, levels)]
        except ValueError as error:
            raise RequestError(str(error)) from error

    async def score_latents(self, body: bytes, version: str | None) -> list[float]:
        self.ready()
        channels = self.reward_model.config.backbone_config["in_channels"]
        request = parse_latent_request(body, version, channels)
        check_latent_shapes(self.reward_model, request, prompt_token_limit(self.reward_model, self.options))
        return await self.batcher.submit(latent_batch_key(request), request, request["latents"].shape[0])

    async def score_images(self, images: list, prompts, options: dict) -> list[float]:
        self.ready()
        if self.pipe is None:
            raise RequestError(
                "this server loaded only the reward model (--latents-only): score latents at /v1/score."
            )
        prompts, options = check_image_request(images, prompts, options)
        return await self.batcher.submit(
            ("images", id(images)), (images, prompts, options), self.options.max_batch_size
        )


async def _read_body(request, limit_mb: float) -> bytes:
    """The request body, refused (400) as soon as it passes `limit_mb`."""
    limit = int(limit_mb * 1024 * 1024)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestError(f"the body ({int(length)} bytes) exceeds --max-body-mb {limit_mb:g}.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the body exceeds --max-body-mb {limit_mb:g}.")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(options: ServeOptions, loader: Callable | None = None, background_load: bool = True):
    """The FastAPI app of `dinalrm-serve` (also the ingress of the Ray Serve deployment).

    The model loads when the app starts (its lifespan): in the background by default, so `/healthz` answers 503
    until it is ready; with `background_load=False` the start waits for it (Ray Serve then routes requests to a
    replica only once its model is loaded). `app.state.server` is the [`RewardServer`].
    """
    server = RewardServer(options, loader)

    @asynccontextmanager
    async def lifespan(app):
        server.batcher.start()
        loading = asyncio.get_running_loop().create_task(server.load())
        if not background_load:
            await loading
        yield
        loading.cancel()
        await server.batcher.stop()

    app = FastAPI(title="dinalrm-serve", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(RequestError)
    async def refuse(request: Request, error: RequestError):
        return JSONResponse({"protocol_version": PROTOCOL_VERSION, "error": str(error)}, status_code=error.status)

    @app.get("/healthz")
    async def healthz():
        server.ready()
        return {"status": "ok", "model": options.model}

    @app.post("/v1/score")
    async def score(request: Request):
        body = await _read_body(request, options.max_body_mb)
        scores = await server.score_latents(body, request.headers.get(PROTOCOL_HEADER))
        return {"protocol_version": PROTOCOL_VERSION, "raw_scores": scores}

    @app.post("/v1/score_images")
    async def score_images(request: Request):
        body = await _read_body(request, options.max_body_mb)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            images, prompts, extra = await _parse_multipart(request, body, options.max_images)
        elif content_type.startswith("application/json"):
            images, prompts, extra = await asyncio.to_thread(_parse_json_images, body, options.max_images)
        else:
            raise RequestError(
                f"content-type {content_type!r} is not supported: send multipart/form-data (files `images`, fields "
                "`prompts`) or application/json with base64 images."
            )
        scores = await server.score_images(images, prompts, extra)
        return {"protocol_version": PROTOCOL_VERSION, "raw_scores": scores}

    return app


def _parse_json_images(body: bytes, max_images: int) -> tuple[list, list[str], dict]:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise RequestError(f"the body is not valid JSON ({type(error).__name__}: {error}).") from None
    return parse_image_json(payload, max_images)


async def _parse_multipart(request, body: bytes, max_images: int = 64) -> tuple[list, list[str], dict]:
    """Images (files `images`), prompts (fields `prompts`, repeated or one) and `t` / `seed` of a multipart body."""

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive).form(max_files=max_images, max_fields=4 * max_images + 8)
    except HTTPException as error:
        raise RequestError(f"the multipart body cannot be read: {error.detail}") from None
    files = form.getlist("images")
    if not files or any(isinstance(item, str) for item in files):
        raise RequestError("multipart bodies need one or more files in the `images` field.")
    if len(files) > max_images:
        raise RequestError(
            f"{len(files)} images in one request; send at most {max_images} (--max-images) per request."
        )
    contents = [(await item.read(), f"image {item.filename!r}") for item in files]
    images = await asyncio.to_thread(lambda: [_decode_image(data, where) for data, where in contents])
    prompts = form.getlist("prompts") or form.getlist("prompt")
    options = {}
    for name, cast in (("t", float), ("seed", int)):
        if form.get(name) is not None:
            try:
                options[name] = cast(form.get(name))
            except (ValueError, TypeError):
                raise RequestError(f"field {name!r} must be a number, got {form.get(name)!r}.") from None
    return images, prompts, options


# ------------------------------------------------------------------------------------------ command line
def options_from_args(args: argparse.Namespace) -> ServeOptions:
    if not 1 <= args.port <= 65535:
        raise SystemExit(f"dinalrm-serve: --port must be a TCP port in 1-65535, got {args.port}.")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise SystemExit("dinalrm-serve: --max-prompt-tokens must be at least 1.")
    for name in ("max_batch_size", "max_queue", "num_replicas", "max_images"):
        if getattr(args, name) < 1:
            raise SystemExit(f"dinalrm-serve: --{name.replace('_', '-')} must be at least 1.")
    if not (
        math.isfinite(args.max_wait_ms + args.max_body_mb + args.request_timeout_s)
        and args.max_wait_ms >= 0
        and args.max_body_mb > 0
        and args.request_timeout_s > 0
    ):
        raise SystemExit("dinalrm-serve: --max-wait-ms must be >= 0, --max-body-mb and --request-timeout-s > 0.")
    return ServeOptions(
        model=args.model,
        base_model=args.base_model,
        dtype=args.dtype,
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_body_mb=args.max_body_mb,
        request_timeout_s=args.request_timeout_s,
        latents_only=args.latents_only,
        normalize=args.normalize,
        max_prompt_tokens=args.max_prompt_tokens,
        max_images=args.max_images,
    )
