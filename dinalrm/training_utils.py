"""Training machinery shared by ``train_dinalrm.py``, its tests and ``benchmarks/bench_train.py``.

* Pair datasets: :class:`ImagePairDataset` decodes images of the canonical pairs of :mod:`dinalrm.data`;
  :class:`CachedPairDataset` reads pre-encoded latents and prompt embeddings from a feature cache written by
  :func:`write_feature_cache`. Both are batched by :class:`BucketBatchSampler` (one aspect-ratio bucket per batch).
* The step: :func:`preference_step` draws one noise level and one noise per pair (shared by both images), presents
  the pair in random left/right order, scores both sides in ONE forward and returns the chosen-first loss.
* Randomness is counter-based (:func:`seeded_generator`): every draw of a step depends only on the seed, the process
  and the data position, so a resumed run repeats the draws of an uninterrupted one without saving RNG states.
* Checkpoints: :func:`list_checkpoints` and :func:`resolve_checkpoint` only see complete checkpoint folders, and
  :func:`save_ema` / :func:`load_ema` store the EMA weights as safetensors keyed by parameter name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modeling_dinalrm import add_noise

from .data import resize_and_center_crop
from .images import ImageLoadError, load_image

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_INFO",
    "CHECKPOINT_PREFIX",
    "WEIGHTING_SCHEMES",
    "BucketBatchSampler",
    "CachedPairDataset",
    "ImagePairDataset",
    "collate_cached_pairs",
    "collate_image_pairs",
    "list_checkpoints",
    "load_ema",
    "parameter_digest",
    "preference_step",
    "read_cache_info",
    "resolve_checkpoint",
    "sample_noise_levels",
    "save_ema",
    "seeded_generator",
    "write_feature_cache",
]

WEIGHTING_SCHEMES = ("uniform", "logit_normal", "constant")
CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE = "training_state.json"
CACHE_INFO = "cache_info.json"
CACHE_FORMAT_VERSION = 1
RUNTIME_SKIP = "runtime_"  # prefix of skip reasons counted while training / caching (vs. while loading the table)
_CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
_EMA_WEIGHTS = "ema_weights.safetensors"
_EMA_STATE = "ema_state.json"


# ----------------------------------------------------------------------------------------------- randomness
def seeded_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and integer ``keys`` (e.g. process, epoch, batch).

    Distinct key tuples give unrelated streams; the same tuple always gives the same stream, on any device.
    """
    digest = hashlib.sha256(json.dumps([seed, *keys]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def sample_noise_levels(
    weighting_scheme: str,
    batch_size: int,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    constant_t: float = 0.4,
) -> torch.Tensor:
    """Noise fractions ``t`` in (0, 1), shape ``(batch_size,)``: uniform, logit-normal (diffusers' sampler) or constant."""
    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise ValueError(f"weighting_scheme={weighting_scheme!r} is not one of {WEIGHTING_SCHEMES}.")
    if weighting_scheme == "constant":
        return torch.full((batch_size,), float(constant_t))
    return compute_density_for_timestep_sampling(
        weighting_scheme, batch_size, logit_mean=logit_mean, logit_std=logit_std, generator=generator
    )


def parameter_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every tensor of ``module``'s state dict (names and bytes): equal digests mean equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- the step
@dataclass
class StepOutput:
    """What one training micro-step produced (the loss keeps its graph)."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    reward_margin: torch.Tensor
    mean_t: torch.Tensor


def preference_step(
    model: torch.nn.Module,
    reward_model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    weighting_scheme: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    constant_t: float = 0.4,
) -> StepOutput:
    """The DiNa-LRM objective on one batch of pairs of clean latents.

    Per pair: one noise level ``t`` and ONE noise shared by chosen and rejected (``x_t = (1 - t) x0 + t eps`` with
    ``t`` snapped to the scheduler's table, see ``modeling_dinalrm.add_noise``), one batched forward of
    ``[chosen; rejected]`` through ``model`` (the possibly DDP-wrapped ``reward_model``), then the model's
    chosen-first ``preference_loss`` over all pairs at once, weighted by ``batch["weights"]``. The pairs are not
    presented in a random order: the loss is symmetric, so a left/right swap would change nothing. Draws from
    ``generator`` in a fixed order: t, then noise.
    """
    chosen, rejected = batch["chosen"], batch["rejected"]
    device, pairs = chosen.device, chosen.shape[0]
    t = sample_noise_levels(weighting_scheme, pairs, generator, logit_mean, logit_std, constant_t)
    noise = randn_tensor(chosen.shape, generator=generator, device=device, dtype=chosen.dtype)
    sigmas, _ = reward_model.snap_noise_level(t, pairs, device)
    noisy = torch.cat([add_noise(chosen, noise, sigmas), add_noise(rejected, noise, sigmas)])
    rewards = model(
        noisy,
        torch.cat([sigmas, sigmas]),
        batch["prompt_embeds"].repeat(2, 1, 1),
        batch["pooled_prompt_embeds"].repeat(2, 1),
    ).rewards.float()
    rewards_chosen, rewards_rejected = rewards.chunk(2)
    loss = reward_model.preference_loss(rewards_chosen, rewards_rejected, sigmas, weights=batch["weights"])
    with torch.no_grad():
        margin = rewards_chosen - rewards_rejected
        return StepOutput(
            loss=loss, accuracy=(margin > 0).float().mean(), reward_margin=margin.mean(), mean_t=sigmas.mean()
        )


# ----------------------------------------------------------------------------------------------- batching
class BucketBatchSampler:
    """Batches of dataset indices where every batch holds pairs of one aspect-ratio bucket.

    With ``shuffle``, the order within each bucket and the order of the batches are drawn from ``(seed, epoch)``;
    call :meth:`start_epoch` before iterating. The last batch of a bucket may be smaller. Every process builds the
    same sequence; accelerate hands each process its share. (The size is deliberately not called ``batch_size``:
    accelerate then treats the batches as variable-length lists, which they are.)
    """

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.pairs_per_batch = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(buckets):
            self._groups.setdefault(tuple(bucket), []).append(index)

    def start_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch`` (deterministic for a seed)."""
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """The batches of the current epoch, in order."""
        generator = seeded_generator(self.seed, self.epoch) if self.shuffle else None
        batches = []
        for bucket in sorted(self._groups):
            indices = self._groups[bucket]
            if generator is not None:
                indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            size = self.pairs_per_batch
            batches += [indices[i : i + size] for i in range(0, len(indices), size)]
        if generator is not None:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return sum(math.ceil(len(indices) / self.pairs_per_batch) for indices in self._groups.values())


# ----------------------------------------------------------------------------------------------- image pairs
class ImagePairDataset(torch.utils.data.Dataset):
    """Canonical preference pairs (see :mod:`dinalrm.data`) decoded to RGB images of their bucket's size.

    An image that fails to decode here (e.g. deleted since the table was checked) yields a ``skip`` item that the
    collate function drops and counts, instead of stopping training.
    """

    def __init__(self, pairs: datasets.Dataset):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return list(zip(self.pairs["bucket_width"], self.pairs["bucket_height"]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.pairs[index]
        size = (row["bucket_width"], row["bucket_height"])
        try:
            chosen, rejected = (resize_and_center_crop(load_image(row[key]), size) for key in ("chosen", "rejected"))
        except ImageLoadError as err:
            return {"index": index, "skip": RUNTIME_SKIP + err.reason}
        return {
            "index": index,
            "prompt": row["prompt"],
            "chosen": chosen,
            "rejected": rejected,
            "weight": row["weight"],
        }


def collate_image_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Lists of prompts and PIL images of one bucket; unreadable pairs are dropped and listed in ``skipped``."""
    kept = [item for item in items if "skip" not in item]
    return {
        "indices": torch.tensor([item["index"] for item in kept], dtype=torch.long),
        "prompts": [item["prompt"] for item in kept],
        "chosen_images": [item["chosen"] for item in kept],
        "rejected_images": [item["rejected"] for item in kept],
        "weights": torch.tensor([item["weight"] for item in kept], dtype=torch.float32),
        "skipped": [item["skip"] for item in items if "skip" in item],
    }


EncodePrompts = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
EncodeImages = Callable[[list[Image.Image]], torch.Tensor]


def _encode_pair_latents(batch: dict[str, Any], encode_images: EncodeImages) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of the chosen and the rejected images, encoded in one call."""
    latents = encode_images(batch["chosen_images"] + batch["rejected_images"])
    return latents[: len(batch["prompts"])], latents[len(batch["prompts"]) :]


def encode_image_pairs(batch: dict[str, Any], encode_prompts: EncodePrompts, encode_images: EncodeImages) -> dict:
    """Turn a :func:`collate_image_pairs` batch into the tensors :func:`preference_step` takes.

    Each prompt is encoded once for its pair (both images share it).
    """
    chosen, rejected = _encode_pair_latents(batch, encode_images)
    prompt_embeds, pooled_prompt_embeds = encode_prompts(batch["prompts"])
    return {
        "chosen": chosen,
        "rejected": rejected,
        "prompt_embeds": prompt_embeds,
        "pooled_prompt_embeds": pooled_prompt_embeds,
        "weights": batch["weights"],
    }


# ----------------------------------------------------------------------------------------------- feature cache
def read_cache_info(cache_dir: str | os.PathLike) -> dict | None:
    """The cache's description (fingerprint, splits, skip counts), or None when no complete cache is there."""
    path = os.path.join(cache_dir, CACHE_INFO)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _chunks(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def write_feature_cache(
    cache_dir: str | os.PathLike,
    split: str,
    pairs: datasets.Dataset,
    encode_prompts: EncodePrompts,
    encode_images: EncodeImages,
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    shard_size: int = 1024,
    num_workers: int = 0,
) -> Counter[str]:
    """Encode one split's prompts and images once and write them as safetensors shards under ``cache_dir/split``.

    Prompts are de-duplicated (``prompts-XXXXXX.safetensors``: ``prompt_embeds``, ``pooled_prompt_embeds``); pairs
    are cut into chunks of ``shard_size`` in dataset order and every chunk into one shard per aspect-ratio bucket
    (``pairs-XXXXXX-WxH.safetensors``: ``chosen``, ``rejected`` latents, ``pair_index``, ``prompt_index``,
    ``weight``). Chunks are spread over processes round-robin; each process returns the pairs it had to skip.
    The cache is only complete once the caller writes ``cache_info.json`` (see :func:`read_cache_info`).
    """
    root = os.path.join(cache_dir, split)
    os.makedirs(root, exist_ok=True)
    prompt_ids: dict[str, int] = {}
    prompt_index = [prompt_ids.setdefault(prompt, len(prompt_ids)) for prompt in pairs["prompt"]]
    unique_prompts = list(prompt_ids)
    for number, chunk in enumerate(_chunks(len(unique_prompts), shard_size)):
        if number % num_processes != process_index:
            continue
        embeds, pooled = [], []
        for start in range(chunk.start, chunk.stop, batch_size):
            prompt_embeds, pooled_prompt_embeds = encode_prompts(unique_prompts[start : min(start + batch_size, chunk.stop)])
            embeds.append(prompt_embeds.cpu())
            pooled.append(pooled_prompt_embeds.cpu())
        save_file(
            {"prompt_embeds": torch.cat(embeds).contiguous(), "pooled_prompt_embeds": torch.cat(pooled).contiguous()},
            os.path.join(root, f"prompts-{number:06d}.safetensors"),
        )

    images = ImagePairDataset(pairs)
    buckets = images.buckets
    batches: list[tuple[int, list[int]]] = []
    for number, chunk in enumerate(_chunks(len(pairs), shard_size)):
        if number % num_processes != process_index:
            continue
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index in chunk:
            by_bucket.setdefault(buckets[index], []).append(index)
        for members in by_bucket.values():
            batches += [(number, members[i : i + batch_size]) for i in range(0, len(members), batch_size)]
    loader = torch.utils.data.DataLoader(
        images, batch_sampler=[indices for _, indices in batches], collate_fn=collate_image_pairs, num_workers=num_workers
    )
    skipped: Counter[str] = Counter()
    shards: dict[tuple[int, tuple[int, int]], dict[str, list[torch.Tensor]]] = {}

    def flush(chunk_number: int) -> None:
        for (number, (width, height)), parts in list(shards.items()):
            if number != chunk_number:
                continue
            tensors = {name: torch.cat(values).contiguous() for name, values in parts.items()}
            save_file(tensors, os.path.join(root, f"pairs-{number:06d}-{width}x{height}.safetensors"))
            del shards[(number, (width, height))]

    current_chunk = None
    for (number, _), batch in zip(batches, loader):
        if current_chunk is not None and number != current_chunk:
            flush(current_chunk)
        current_chunk = number
        skipped.update(batch["skipped"])
        if not batch["prompts"]:
            continue
        chosen, rejected = _encode_pair_latents(batch, encode_images)
        indices = batch["indices"]
        bucket = buckets[int(indices[0])]
        parts = shards.setdefault((number, bucket), {})
        for name, value in (
            ("chosen", chosen.cpu()),
            ("rejected", rejected.cpu()),
            ("pair_index", indices),
            ("prompt_index", torch.tensor([prompt_index[i] for i in indices.tolist()], dtype=torch.long)),
            ("weight", batch["weights"]),
        ):
            parts.setdefault(name, []).append(value)
    if current_chunk is not None:
        flush(current_chunk)
    return skipped


class CachedPairDataset(torch.utils.data.Dataset):
    """Pairs read back from a feature cache (no VAE, no text encoder): item ``i`` is the ``i``-th kept pair.

    Tensors are read row by row from memory-mapped safetensors shards, so the cache never has to fit in memory.
    """

    def __init__(self, cache_dir: str | os.PathLike, split: str):
        self.root = os.path.join(cache_dir, split)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"The feature cache {cache_dir} has no {split!r} split.")
        rows: list[tuple[int, str, int, tuple[int, int]]] = []
        self._prompt_files: list[str] = []
        for name in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, name)
            if name.startswith("prompts-"):
                self._prompt_files.append(path)
            elif name.startswith("pairs-"):
                width, height = (int(v) for v in name.removesuffix(".safetensors").rsplit("-", 1)[1].split("x"))
                with safe_open(path, framework="pt") as handle:
                    pair_index = handle.get_tensor("pair_index").tolist()
                rows += [(pair, path, row, (width, height)) for row, pair in enumerate(pair_index)]
        rows.sort()
        self._rows = [(path, row) for _, path, row, _ in rows]
        self.buckets = [bucket for _, _, _, bucket in rows]
        self._prompt_rows: int | None = None
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not cross into data loader workers
        return state

    def _open(self, path: str):
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def _prompt(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._prompt_rows is None:
            self._prompt_rows = self._open(self._prompt_files[0]).get_slice("pooled_prompt_embeds").get_shape()[0]
        handle = self._open(self._prompt_files[index // self._prompt_rows])
        row = index % self._prompt_rows
        return handle.get_slice("prompt_embeds")[row : row + 1][0], handle.get_slice("pooled_prompt_embeds")[row : row + 1][0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path, row = self._rows[index]
        handle = self._open(path)
        item = {name: handle.get_slice(name)[row : row + 1][0] for name in ("chosen", "rejected", "prompt_index", "weight")}
        item["prompt_embeds"], item["pooled_prompt_embeds"] = self._prompt(int(item.pop("prompt_index")))
        return item


def collate_cached_pairs(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack cached pairs of one bucket into the tensors :func:`preference_step` takes."""
    batch = {name: torch.stack([item[name] for item in items]) for name in ("chosen", "rejected", "prompt_embeds",
                                                                            "pooled_prompt_embeds")}
    batch["weights"] = torch.stack([item["weight"] for item in items]).float()
    return batch


# ----------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """Complete checkpoints ``(step, path)`` in ``output_dir``, oldest first.

    Checkpoints are written under a temporary name and renamed when complete, so a folder named
    ``checkpoint-<step>`` holding its ``training_state.json`` is complete; anything else is ignored.
    """
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, TRAINING_STATE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_checkpoint(output_dir: str | os.PathLike, spec: str) -> str | None:
    """The folder ``--resume_from_checkpoint`` names: ``latest`` (None when there is none yet) or a path/name."""
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = spec if os.path.isdir(spec) else os.path.join(output_dir, spec)
    if not os.path.isfile(os.path.join(path, TRAINING_STATE)):
        raise FileNotFoundError(f"{spec!r} is not a complete checkpoint folder (no {TRAINING_STATE} in {path}).")
    return path


def remove_old_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[str]:
    """Delete the oldest complete checkpoints so that at most ``keep`` remain; returns the removed paths."""
    checkpoints = list_checkpoints(output_dir)
    removed = [path for _, path in checkpoints[: max(0, len(checkpoints) - keep)]]
    for path in removed:
        shutil.rmtree(path)
    return removed


def save_ema(ema: EMAModel, names: Sequence[str], directory: str | os.PathLike) -> None:
    """EMA weights as safetensors keyed by parameter name, plus its counters as JSON (exactly restorable)."""
    os.makedirs(directory, exist_ok=True)
    save_file(
        {name: shadow.detach().contiguous() for name, shadow in zip(names, ema.shadow_params)},
        os.path.join(directory, _EMA_WEIGHTS),
    )
    counters = {key: value for key, value in ema.state_dict().items() if key != "shadow_params"}
    with open(os.path.join(directory, _EMA_STATE), "w", encoding="utf-8") as handle:
        json.dump(counters, handle, indent=2)


def load_ema(ema: EMAModel, names: Sequence[str], directory: str | os.PathLike) -> None:
    """Restore what :func:`save_ema` wrote; the parameter names must match the ones being averaged."""
    weights = load_file(os.path.join(directory, _EMA_WEIGHTS))
    if set(weights) != set(names):
        missing, unexpected = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
        raise ValueError(f"EMA weights do not match the trainable parameters: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    with open(os.path.join(directory, _EMA_STATE), encoding="utf-8") as handle:
        counters = json.load(handle)
    device = ema.shadow_params[0].device if ema.shadow_params else "cpu"
    ema.load_state_dict({**counters, "shadow_params": [weights[name].to(device) for name in names]})


# ------------------------------------------------------------------------------- accelerate's state without pickles
#: Files that `accelerator.save_state` writes with `torch.save` (optimizer, LR scheduler, sampler, grad scaler,
#: RNG states, registered objects); checkpoints keep them as safetensors instead (DESIGN §9).
ACCELERATE_PICKLE_SUFFIXES = (".bin", ".pkl", ".pt")
_STATE_TREE = "dinalrm_state_tree"
_STATE_SOURCE = "dinalrm_state_source"


def _state_to_tree(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able description of a state object; its tensors and arrays go into `tensors`."""
    if isinstance(value, torch.Tensor):
        tensors[str(len(tensors))] = value.detach().cpu().contiguous()
        return {"tensor": str(len(tensors) - 1)}
    if isinstance(value, np.ndarray):
        wide = value.astype(np.float64 if value.dtype.kind == "f" else np.int64)
        tensors[str(len(tensors))] = torch.from_numpy(np.ascontiguousarray(wide))
        return {"ndarray": str(len(tensors) - 1), "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {"dict": [[_state_to_tree(k, tensors), _state_to_tree(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_state_to_tree(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_state_to_tree(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} from accelerate's checkpoint state without pickle")


def _tree_to_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `_state_to_tree`."""
    if isinstance(tree, list):
        return [_tree_to_state(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "tensor" in tree:
        return tensors[tree["tensor"]]
    if "ndarray" in tree:
        return tensors[tree["ndarray"]].numpy().astype(np.dtype(tree["dtype"]))
    if "tuple" in tree:
        return tuple(_tree_to_state(v, tensors) for v in tree["tuple"])
    return {_tree_to_state(k, tensors): _tree_to_state(v, tensors) for k, v in tree["dict"]}


def convert_accelerate_pickles(checkpoint_dir: str | os.PathLike) -> list[str]:
    """Replace the pickles `accelerator.save_state` wrote in `checkpoint_dir` by safetensors files; returns their names.

    Each `<name>` becomes `<name>.safetensors` holding the tensors, with the structure (dict keys, tuples,
    numbers) as JSON in the metadata; `restore_accelerate_pickles` gives accelerate its files back on resume.
    """
    from accelerate.utils import load

    converted = []
    for name in sorted(os.listdir(checkpoint_dir)):
        path = os.path.join(checkpoint_dir, name)
        if not (os.path.isfile(path) and name.endswith(ACCELERATE_PICKLE_SUFFIXES)):
            continue
        tensors: dict[str, torch.Tensor] = {}
        tree = _state_to_tree(load(path, map_location="cpu"), tensors)
        save_file(tensors, f"{path}.safetensors", metadata={_STATE_TREE: json.dumps(tree), _STATE_SOURCE: name})
        os.remove(path)
        converted.append(name)
    return converted


def restore_accelerate_pickles(checkpoint_dir: str | os.PathLike, work_dir: str | os.PathLike) -> None:
    """Lay out `checkpoint_dir` in `work_dir` as `accelerator.load_state` expects it.

    Entries are symlinked; files converted by `convert_accelerate_pickles` are written back in accelerate's
    format, in `work_dir` only (a temporary folder), so the checkpoint itself stays pickle-free.
    """
    for name in os.listdir(checkpoint_dir):
        path = os.path.join(checkpoint_dir, name)
        metadata = None
        if name.endswith(".safetensors") and os.path.isfile(path):
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
        if metadata and _STATE_TREE in metadata:
            tensors = load_file(path)
            state = _tree_to_state(json.loads(metadata[_STATE_TREE]), tensors)
            torch.save(state, os.path.join(work_dir, metadata[_STATE_SOURCE]))
        else:
            os.symlink(os.path.abspath(path), os.path.join(work_dir, name))
