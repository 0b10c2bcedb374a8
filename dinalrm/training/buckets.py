"""Aspect-ratio buckets: which bucket an image or pair goes to, batches of one bucket, the buckets of a model.

Every consumer of buckets (the data adapters of `dinalrm.data`, the data loaders and the feature cache of
`train_dinalrm.py`) takes them from here, so the bucket of a pair is decided in one place.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from diffusers import AutoencoderKL

from .utils import seeded_generator


__all__ = ["ASPECT_RATIO_BUCKETS", "BucketBatchSampler", "BucketSet", "buckets_for_model"]

# The paper's aspect-ratio buckets near 1024², plus 512² and 256² for small images.
ASPECT_RATIO_BUCKETS: tuple[tuple[int, int], ...] = (
    (1024, 1024), (1248, 832), (832, 1248), (1344, 896), (896, 1344), (1024, 768), (768, 1024),
    (1472, 832), (832, 1472), (1152, 832), (832, 1152), (512, 512), (256, 256),
)  # fmt: skip
_BUCKET_BASE_RESOLUTION = 1024


class BucketSet:
    """The `ASPECT_RATIO_BUCKETS` scaled to `resolution` and snapped to `multiple`.

    `multiple` is the VAE down-sampling factor times the transformer patch size (8 x 2 = 16 for
    SD3), so every bucket maps to a whole number of latent patches. An image goes to the bucket with
    the closest aspect ratio (log-ratio distance); among buckets of that ratio (1024², 512², 256²)
    the one closest in log-area wins, ties going to the larger one.
    """

    def __init__(self, resolution: int = 1024, multiple: int = 16) -> None:
        if resolution <= 0 or multiple <= 0:
            raise ValueError(f"resolution and multiple must be positive, got {resolution} and {multiple}.")
        self.resolution = resolution
        self.multiple = multiple
        scaled = (
            (
                self._snap(w * resolution / _BUCKET_BASE_RESOLUTION),
                self._snap(h * resolution / _BUCKET_BASE_RESOLUTION),
            )
            for w, h in ASPECT_RATIO_BUCKETS
        )
        self.buckets: tuple[tuple[int, int], ...] = tuple(dict.fromkeys(scaled))
        ratios: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for w, h in self.buckets:
            g = math.gcd(w, h)
            ratios.setdefault((w // g, h // g), []).append((w, h))
        self._classes = list(ratios.values())

    def __repr__(self) -> str:
        return f"BucketSet(resolution={self.resolution}, multiple={self.multiple})"

    def _snap(self, value: float) -> int:
        return max(self.multiple, int(math.floor(value / self.multiple + 0.5)) * self.multiple)

    def _ratio_class(self, width: int, height: int) -> int:
        if width <= 0 or height <= 0:
            raise ValueError(f"Image size must be positive, got {width}x{height}.")
        target = math.log(width / height)
        distances = [abs(target - math.log(c[0][0] / c[0][1])) for c in self._classes]
        return distances.index(min(distances))

    def _closest_size(self, index: int, log_area: float) -> tuple[int, int]:
        candidates = self._classes[index]
        distances = [abs(log_area - math.log(w * h)) for w, h in candidates]
        return candidates[distances.index(min(distances))]

    def assign_bucket(self, width: int, height: int) -> tuple[int, int]:
        """Bucket `(width, height)` for an image of the given size."""
        return self._closest_size(self._ratio_class(width, height), math.log(width * height))

    def assign_pair(self, first: tuple[int, int], second: tuple[int, int]) -> tuple[int, int] | None:
        """Common bucket of two image sizes, or None when their aspect ratios fall in different buckets.

        The size is picked for the geometric mean of the two areas, so neither image dominates.
        """
        index = self._ratio_class(*first)
        if self._ratio_class(*second) != index:
            return None
        log_area = 0.5 * (math.log(first[0] * first[1]) + math.log(second[0] * second[1]))
        return self._closest_size(index, log_area)


class BucketBatchSampler:
    """Batches of dataset indices where every batch holds pairs of one aspect-ratio bucket.

    With `shuffle`, the order within each bucket and the order of the batches are drawn from `(seed, epoch)`;
    call `start_epoch` before iterating. The last batch of a bucket may be smaller. Every process builds the
    same sequence; accelerate hands each process its share. (The size is deliberately not called `batch_size`:
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
        """Select the shuffle of `epoch` (deterministic for a seed)."""
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


def buckets_for_model(
    pretrained_model_name_or_path: str,
    patch_size: int,
    resolution: int,
    multiple: int | None = None,
    revision: str | None = None,
) -> BucketSet:
    """Buckets at `resolution` whose sides give whole backbone patches after the VAE of the SD3 pipeline.

    `multiple` defaults to the VAE's down-sampling factor (read from its config, no weights loaded) times the
    transformer's `patch_size`.
    """
    if multiple is None:
        vae_config = AutoencoderKL.load_config(pretrained_model_name_or_path, subfolder="vae", revision=revision)
        multiple = 2 ** (len(vae_config["block_out_channels"]) - 1) * patch_size
    return BucketSet(resolution, multiple)
