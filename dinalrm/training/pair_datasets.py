"""Image pairs for training: canonical pairs (see `dinalrm.data`) decoded and encoded on the fly.

[`ImagePairDataset`] decodes the two images of a pair to their bucket's size, `collate_image_pairs`
batches them (dropping pairs whose images stopped decoding) and `encode_image_pairs` turns a batch into the
latents and prompt embeddings `dinalrm.training.utils.preference_step` takes. The feature cache
(`dinalrm.training.feature_cache`) runs the same encoders once, up front.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import torch
from PIL import Image

from dinalrm.data import ImageLoadError, load_image, resize_and_center_crop


__all__ = [
    "RUNTIME_SKIP",
    "EncodeImages",
    "EncodePrompts",
    "ImagePairDataset",
    "collate_image_pairs",
    "encode_image_pairs",
    "encode_pair_latents",
]

RUNTIME_SKIP = "runtime_"  # prefix of skip reasons counted while training / caching (vs. while loading the table)


class ImagePairDataset(torch.utils.data.Dataset):
    """Canonical preference pairs (see `dinalrm.data`) decoded to RGB images of their bucket's size.

    An image that fails to decode here (e.g. deleted since the table was checked) yields a `skip` item that the
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
    """Lists of prompts and PIL images of one bucket; unreadable pairs are dropped and listed in `skipped`."""
    kept = [item for item in items if "skip" not in item]
    return {
        "indices": torch.tensor([item["index"] for item in kept], dtype=torch.long),
        "prompts": [item["prompt"] for item in kept],
        "chosen_images": [item["chosen"] for item in kept],
        "rejected_images": [item["rejected"] for item in kept],
        "weights": torch.tensor([item["weight"] for item in kept], dtype=torch.float32),
        "skipped": [item["skip"] for item in items if "skip" in item],
    }


# `(prompt_embeds, pooled_prompt_embeds)`; for Z-Image a list of per-prompt `(tokens_i, dim)` tensors and `None`.
EncodePrompts = Callable[[list[str]], tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | None]]
EncodeImages = Callable[[list[Image.Image]], torch.Tensor]


def encode_pair_latents(batch: dict[str, Any], encode_images: EncodeImages) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of the chosen and the rejected images, encoded in one call."""
    latents = encode_images(batch["chosen_images"] + batch["rejected_images"])
    return latents[: len(batch["prompts"])], latents[len(batch["prompts"]) :]


def encode_image_pairs(batch: dict[str, Any], encode_prompts: EncodePrompts, encode_images: EncodeImages) -> dict:
    """Turn a `collate_image_pairs` batch into the tensors `preference_step` takes.

    Each prompt is encoded once for its pair (both images share it).
    """
    chosen, rejected = encode_pair_latents(batch, encode_images)
    prompt_embeds, pooled_prompt_embeds = encode_prompts(batch["prompts"])
    return {
        "chosen": chosen,
        "rejected": rejected,
        "prompt_embeds": prompt_embeds,
        "pooled_prompt_embeds": pooled_prompt_embeds,
        "weights": batch["weights"],
    }
