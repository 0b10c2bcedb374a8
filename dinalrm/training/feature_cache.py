"""The feature cache: prompts and images encoded once into safetensors shards, and read back for training.

Training from the cache never loads the VAE or the text encoders. A cache is complete once its `cache_info.json`
(fingerprint of what the features depend on, splits, skip counts) is in place; a cache built for other settings is
refused rather than silently reused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Mapping
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .buckets import BucketSet
from .pair_datasets import (
    EncodeImages,
    EncodePrompts,
    ImagePairDataset,
    collate_image_pairs,
    encode_pair_latents,
)


logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CACHE_INFO",
    "FINGERPRINT_SETTINGS",
    "CachedPairDataset",
    "build_feature_cache",
    "cache_fingerprint",
    "collate_cached_pairs",
    "read_cache_info",
    "read_valid_cache_info",
    "write_feature_cache",
]

CACHE_INFO = "cache_info.json"
CACHE_FORMAT_VERSION = 1
_PARTIAL_CACHE_INFO = f".partial-{CACHE_INFO}"
#: The training flags (`train_dinalrm.py` argument names) the cached features depend on, besides the buckets and
#: the dtype: the model that encodes, the data and its selection.
FINGERPRINT_SETTINGS = (
    "pretrained_model_name_or_path", "revision", "variant", "max_sequence_length", "dataset_name",
    "dataset_config_name", "train_data_dir", "image_root", "data_format", "prompt_column", "chosen_column",
    "rejected_column", "weight_column", "min_confidence", "max_train_samples", "validation_split",
    "validation_dataset_name", "max_validation_samples",
)  # fmt: skip


def cache_fingerprint(
    settings: Mapping[str, Any], buckets: BucketSet, dtype: torch.dtype, context_embedded: bool = False
) -> dict:
    """Everything the cached features depend on: `settings` holds the values of `FINGERPRINT_SETTINGS`.

    `context_embedded`: the prompt tokens are stored after the (frozen) context embedder, at backbone width, rather
    than as the text encoders' output. Only such a cache carries the `prompt_embeds` key, so a cache of raw tokens
    written before compact caches existed is still read as what it is.
    """
    return {
        "format": CACHE_FORMAT_VERSION,
        **{key: settings[key] for key in FINGERPRINT_SETTINGS},
        "resolution": buckets.resolution,
        "bucket_multiple": buckets.multiple,
        "dtype": str(dtype),
        **({"prompt_embeds": "context_embedder"} if context_embedded else {}),
    }


def _damaged(cache_dir: str | os.PathLike, problem: str) -> ValueError:
    return ValueError(
        f"The feature cache in {cache_dir} is damaged: {problem}. Delete that folder and run again with "
        "--precompute_features to rebuild it (or pass another --cache_dir)."
    )


def read_cache_info(cache_dir: str | os.PathLike) -> dict | None:
    """The cache's description (fingerprint, splits, skip counts), or None when no complete cache is there.

    A `cache_info.json` that is not valid JSON or lacks one of its fields is refused with a `ValueError`.
    """
    path = os.path.join(cache_dir, CACHE_INFO)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            info = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _damaged(cache_dir, f"{CACHE_INFO} is not valid JSON ({err})") from err
    if not (isinstance(info, dict) and {"fingerprint", "splits", "skipped"} <= set(info)):
        raise _damaged(cache_dir, f"{CACHE_INFO} lacks its fingerprint, splits or skip counts")
    return info


def _chunks(count: int, size: int) -> list[range]:
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def _prompt_shard(embeds: list[torch.Tensor], pooled: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a prompts shard, one row per prompt: `prompt_embeds` and `pooled_prompt_embeds`, or for
    per-prompt captions without a pooled embedding (Z-Image) `prompt_embeds` zero-padded to the longest and
    `prompt_lengths`."""
    if pooled:
        return {
            "prompt_embeds": torch.cat(embeds).contiguous(),
            "pooled_prompt_embeds": torch.cat(pooled).contiguous(),
        }
    return {
        "prompt_embeds": torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True).contiguous(),
        "prompt_lengths": torch.tensor([len(e) for e in embeds]),
    }


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
    """Encode one split's prompts and images once and write them as safetensors shards under `cache_dir/split`.

    Prompts are de-duplicated (`prompts-XXXXXX.safetensors`: `prompt_embeds`, `pooled_prompt_embeds`); pairs
    are cut into chunks of `shard_size` in dataset order and every chunk into one shard per aspect-ratio bucket
    (`pairs-XXXXXX-WxH.safetensors`: `chosen`, `rejected` latents, `pair_index`, `prompt_index`,
    `weight`). Chunks are spread over processes round-robin; each process returns the pairs it had to skip.
    The cache is only complete once `cache_info.json` is written (see `build_feature_cache`).
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
            prompts = unique_prompts[start : min(start + batch_size, chunk.stop)]
            prompt_embeds, pooled_prompt_embeds = encode_prompts(prompts)
            if isinstance(prompt_embeds, (list, tuple)):  # one tensor per prompt, at its own length (Z-Image)
                embeds.extend(e.cpu() for e in prompt_embeds)
            else:
                embeds.append(prompt_embeds.cpu())
                pooled.append(pooled_prompt_embeds.cpu())
        save_file(_prompt_shard(embeds, pooled), os.path.join(root, f"prompts-{number:06d}.safetensors"))

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
        images,
        batch_sampler=[indices for _, indices in batches],
        collate_fn=collate_image_pairs,
        num_workers=num_workers,
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
        chosen, rejected = encode_pair_latents(batch, encode_images)
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
    """Pairs read back from a feature cache (no VAE, no text encoder): item `i` is the `i`-th kept pair.

    Tensors are read row by row from memory-mapped safetensors shards, so the cache never has to fit in memory.
    Opening checks the cache against its `cache_info.json`: a shard that cannot be read (truncated) or that is
    missing (fewer pairs, or fewer prompts, than were cached) is refused with a `ValueError` naming it.
    `context_embedded` says whether its `prompt_embeds` are the context embedder's output (see `cache_fingerprint`).
    """

    def __init__(self, cache_dir: str | os.PathLike, split: str):
        self.root = os.path.join(cache_dir, split)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"The feature cache {cache_dir} has no {split!r} split.")
        rows: list[tuple[int, str, int, tuple[int, int]]] = []
        self._prompt_files: list[str] = []
        prompt_rows, prompts_used = [], 0
        for name in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, name)
            try:
                with safe_open(path, framework="pt") as handle:
                    if name.startswith("prompts-"):
                        self._prompt_files.append(path)
                        prompt_rows.append(handle.get_slice("prompt_embeds").get_shape()[0])
                    elif name.startswith("pairs-"):
                        width, height = (
                            int(v) for v in name.removesuffix(".safetensors").rsplit("-", 1)[1].split("x")
                        )
                        pair_index = handle.get_tensor("pair_index").tolist()
                        prompts_used = max(prompts_used, int(handle.get_tensor("prompt_index").max()) + 1)
                        rows += [(pair, path, row, (width, height)) for row, pair in enumerate(pair_index)]
            except (SafetensorError, OSError) as err:
                raise _damaged(cache_dir, f"{split}/{name} cannot be read ({err}); it may be truncated") from err
        info = read_cache_info(cache_dir)
        self.context_embedded = info is not None and info["fingerprint"].get("prompt_embeds") == "context_embedder"
        expected = info["skipped"].get(split, {}).get("kept") if info is not None else None
        if expected is not None and len(rows) != expected:
            raise _damaged(cache_dir, f"its {split!r} split holds {len(rows)} pairs where {expected} were cached")
        numbers = [int(os.path.basename(path)[len("prompts-") :].split(".")[0]) for path in self._prompt_files]
        if numbers != list(range(len(numbers))) or sum(prompt_rows) < prompts_used:
            raise _damaged(cache_dir, f"prompt shards of its {split!r} split are missing")
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

    def _prompt(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(prompt_embeds, pooled_prompt_embeds)` of one prompt; per-prompt captions come at their own length,
        without a pooled embedding."""
        if self._prompt_rows is None:
            self._prompt_rows = self._open(self._prompt_files[0]).get_slice("prompt_embeds").get_shape()[0]
        handle = self._open(self._prompt_files[index // self._prompt_rows])
        row = index % self._prompt_rows
        embeds = handle.get_slice("prompt_embeds")[row : row + 1][0]
        if "prompt_lengths" in handle.keys():
            return embeds[: int(handle.get_slice("prompt_lengths")[row : row + 1][0])], None
        return embeds, handle.get_slice("pooled_prompt_embeds")[row : row + 1][0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path, row = self._rows[index]
        handle = self._open(path)
        names = ("chosen", "rejected", "prompt_index", "weight")
        item = {name: handle.get_slice(name)[row : row + 1][0] for name in names}
        item["prompt_embeds"], item["pooled_prompt_embeds"] = self._prompt(int(item.pop("prompt_index")))
        return item


def collate_cached_pairs(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack cached pairs of one bucket into the tensors `preference_step` takes (per-prompt captions stay a list)."""
    batch = {name: torch.stack([item[name] for item in items]) for name in ("chosen", "rejected")}
    embeds = [item["prompt_embeds"] for item in items]
    if items[0]["pooled_prompt_embeds"] is None:
        batch["prompt_embeds"], batch["pooled_prompt_embeds"] = embeds, None
    else:
        batch["prompt_embeds"] = torch.stack(embeds)
        batch["pooled_prompt_embeds"] = torch.stack([item["pooled_prompt_embeds"] for item in items])
    batch["weights"] = torch.stack([item["weight"] for item in items]).float()
    return batch


def read_valid_cache_info(cache_dir: str | os.PathLike, fingerprint: dict) -> dict | None:
    """`read_cache_info`, refusing (ValueError, naming the differences) a cache built for another fingerprint."""
    info = read_cache_info(cache_dir)
    if info is None:
        return None
    changed = {
        key: (info["fingerprint"].get(key), fingerprint.get(key))
        for key in {**info["fingerprint"], **fingerprint}
        if info["fingerprint"].get(key) != fingerprint.get(key)
    }
    if changed:
        raise ValueError(
            f"The feature cache in {cache_dir} was built with other settings {changed} (cached, now): pick "
            "another --cache_dir or delete that one."
        )
    return info


def build_feature_cache(
    accelerator: Accelerator,
    cache_dir: str | os.PathLike,
    splits: Mapping[str, datasets.Dataset],
    skipped: dict[str, dict[str, int]],
    encode_prompts: EncodePrompts,
    encode_images: EncodeImages,
    fingerprint: dict,
    batch_size: int,
    num_workers: int = 0,
) -> dict:
    """Encode every split into `cache_dir` (all processes share the work) and mark the cache complete.

    `skipped` (per split, the counts of the rows dropped while loading the table) gets the pairs whose images no
    longer decode added; `cache_info.json` is written last, atomically, so an interrupted build is never used.
    Returns the cache's description, as `read_cache_info` reads it back.
    """
    if accelerator.is_main_process:
        for split in splits:
            shutil.rmtree(os.path.join(cache_dir, split), ignore_errors=True)
    accelerator.wait_for_everyone()
    runtime = {}
    for split, pairs in splits.items():
        logger.info(f"Encoding {len(pairs)} {split} pairs into {cache_dir}")
        runtime[split] = write_feature_cache(
            cache_dir,
            split,
            pairs,
            encode_prompts,
            encode_images,
            batch_size=batch_size,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            num_workers=num_workers,
        )
    gathered = gather_object([runtime])
    for split in splits:
        for counts in gathered:
            for reason, count in counts[split].items():
                skipped[split][reason] = skipped[split].get(reason, 0) + count
                skipped[split]["skipped"] += count
                skipped[split]["kept"] -= count
    info = {"fingerprint": fingerprint, "splits": list(splits), "skipped": skipped}
    if accelerator.is_main_process:
        partial = os.path.join(cache_dir, _PARTIAL_CACHE_INFO)
        with open(partial, "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2)
        os.replace(partial, os.path.join(cache_dir, CACHE_INFO))
    accelerator.wait_for_everyone()
    return info
