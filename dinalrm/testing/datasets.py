"""Tiny datasets on disk in the real published layouts: preference data for the trainer, evaluation benchmarks.

Pictures are seeded (`make_tiny_image_pair`), so every builder is deterministic for a seed.
"""

from __future__ import annotations

import io
import json
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


_PAIR_PROMPTS: tuple[str, ...] = (
    "a photo of a red apple on a table",
    "a cute dog in a park",
    "a castle on a mountain at sunset",
    "a watercolor painting of a boat on the sea",
    "a robot holding a cup",
    "a cat sitting in a garden",
)
PREFERENCE_FORMATS: tuple[str, ...] = ("canonical", "hpdv3", "pickapic")


def _encode_image(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def make_tiny_image_pair(
    rng: np.random.Generator, size: tuple[int, int] = (32, 32)
) -> tuple[Image.Image, Image.Image]:
    """A smooth random picture (the preferred image) and the same picture with strong pixel noise (the other one)."""
    width, height = size
    coarse = rng.uniform(0, 255, size=(max(2, height // 8), max(2, width // 8), 3)).astype(np.uint8)
    clean = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    noisy = np.asarray(clean, dtype=np.float32) + rng.normal(0.0, 40.0, size=(height, width, 3))
    return clean, Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def write_tiny_preference_dataset(
    output_dir: str | PathLike[str],
    data_format: str = "canonical",
    num_pairs: int = 8,
    size: tuple[int, int] = (32, 32),
    seed: int = 0,
    split: str = "train",
    bad_rows: bool = True,
) -> str:
    """A tiny preference dataset on disk in one of the real schemas the trainer reads; returns its folder.

    `canonical`: `<split>.parquet` with `prompt`, `chosen` / `rejected` (`datasets.Image`) and `weight`.
    `hpdv3`: `<split>.json` (`prompt, path1, path2, model1, model2, choice_dist, confidence`; `path1` is the
    preferred image) with PNG files under `images/`. `pickapic`: `<split>.parquet` with `caption`, JPEG
    bytes `jpg_0` / `jpg_1`, `label_0` / `label_1` (the preferred side alternates). With `bad_rows`, one
    more row has a corrupt image (HPDv3: a missing file) and Pick-a-Pic also gets a tie: rows a trainer must skip.
    """
    import datasets  # optional dependency (the train / eval extras); only these builders need it

    from dinalrm.data import write_canonical_pairs

    if data_format not in PREFERENCE_FORMATS:
        raise ValueError(f"data_format must be one of {PREFERENCE_FORMATS}, got {data_format!r}.")
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pairs = [(_PAIR_PROMPTS[i % len(_PAIR_PROMPTS)], *make_tiny_image_pair(rng, size)) for i in range(num_pairs)]
    corrupt = _encode_image(pairs[0][1])[:40]
    if data_format == "canonical":
        rows = [{"prompt": p, "chosen": c, "rejected": r, "weight": 1.0} for p, c, r in pairs]
        if bad_rows:
            rows.append({**rows[0], "chosen": {"bytes": corrupt, "path": None}})
        return write_canonical_pairs(root, rows, split)
    if data_format == "hpdv3":
        (root / "images").mkdir(exist_ok=True)
        records = []
        for i, (prompt, chosen, rejected) in enumerate(pairs):
            paths = [f"images/{split}-{i:04d}-{name}.png" for name in ("a", "b")]
            chosen.save(root / paths[0])
            rejected.save(root / paths[1])
            records.append(
                {
                    "prompt": prompt,
                    "path1": paths[0],
                    "path2": paths[1],
                    "model1": "sd3",
                    "model2": "sdxl",
                    "choice_dist": [3, 1],
                    "confidence": 0.97,
                }
            )
        if bad_rows:
            records.append({**records[0], "path2": f"images/{split}-missing.png"})
        (root / f"{split}.json").write_text(json.dumps(records))
        return str(root)
    columns: dict[str, list[Any]] = {
        "caption": [],
        "jpg_0": [],
        "jpg_1": [],
        "label_0": [],
        "label_1": [],
        "model_0": [],
        "model_1": [],
    }
    rows = [(prompt, chosen, rejected, i % 2 == 0) for i, (prompt, chosen, rejected) in enumerate(pairs)]
    for prompt, chosen, rejected, first in rows:
        images = (chosen, rejected) if first else (rejected, chosen)
        labels = (1.0, 0.0) if first else (0.0, 1.0)
        for key, value in zip(
            ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "model_0", "model_1"),
            (prompt, *(_encode_image(im, "JPEG") for im in images), *labels, "sd3", "sdxl"),
        ):
            columns[key].append(value)
    if bad_rows:
        for key, value in zip(columns, (pairs[0][0], corrupt, _encode_image(pairs[0][2], "JPEG"), 1.0, 0.0, "a", "b")):
            columns[key].append(value)
        for key, value in zip(
            columns, (pairs[1][0], *(_encode_image(im, "JPEG") for im in pairs[1][1:]), 0.5, 0.5, "a", "b")
        ):
            columns[key].append(value)
    datasets.Dataset.from_dict(columns).to_parquet(str(root / f"{split}.parquet"))
    return str(root)


TINY_BENCHMARKS: tuple[str, ...] = ("imagereward", "hpdv2", "hpdv3", "genai_bench", "pickapic_v2")


def write_tiny_benchmarks(data_dir: str | PathLike[str], size: tuple[int, int] = (32, 32), seed: int = 0) -> str:
    """Tiny copies of the five evaluation benchmarks, in their published layouts, under `data_dir/<name>/`.

    Each holds a case its protocol must handle (`dinalrm.data.benchmarks` documents the protocols):
    `imagereward` (`test.json`: `id, prompt, generations, ranking`) ranks [1, 2, 2, 3] (a human tie) and
    [3, 1, 2, 4] with the last file missing, and one image is wider than `size`; `hpdv2` (`test.json`:
    `prompt, image_path, rank, raw_annotations`) ranks [1, 2, 2] (a credited tie) and [2, 1, 4, 3]; `hpdv3`
    (`test.json`: `prompt, path1, path2, model1, model2, choice_dist, confidence`) has three pairs, one with
    a missing `path2`; `genai_bench` (`test.parquet` with `datasets.Image` columns) has left, right, tie,
    both-bad and left votes; `pickapic_v2` (`data/test_unique-*.parquet` and `data/test-*.parquet`, JPEG
    bytes) has 1/0, 0/1, a 0.5/0.5 tie and a corrupt JPEG. Pictures are seeded; a preferred image is the clean
    member of a `make_tiny_image_pair`. Returns `data_dir`.
    """
    import datasets  # optional dependency (the train / eval extras); only these builders need it

    root = Path(data_dir)
    rng = np.random.default_rng(seed)
    width, height = size

    def picture(picture_size: tuple[int, int] = size) -> Image.Image:
        return make_tiny_image_pair(rng, picture_size)[0]

    def write_files(folder: Path, images: dict[str, Image.Image]) -> None:
        for relpath, image in images.items():
            (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
            image.save(folder / relpath)

    folder = root / "imagereward"
    records = [
        {"id": "000001-0001", "prompt": "a red apple on a table",
         "generations": [f"images/test/000001-{k}.png" for k in range(4)], "ranking": [1, 2, 2, 3]},
        {"id": "000002-0002", "prompt": "a cat sitting in a garden",
         "generations": [f"images/test/000002-{k}.png" for k in range(4)], "ranking": [3, 1, 2, 4]},
    ]  # fmt: skip
    files = {path: picture() for record in records for path in record["generations"][:3]}
    files[records[0]["generations"][3]] = picture((width + 8, height))
    write_files(folder, files)
    (folder / "test.json").write_text(json.dumps(records))

    folder = root / "hpdv2"
    records = [
        {"prompt": "a castle on a mountain", "image_path": ["00000.jpg", "00001.jpg", "00002.jpg"], "rank": [1, 2, 2],
         "raw_annotations": [[1, 2, 3], [1, 3, 2]]},
        {"prompt": "a boat on the sea", "image_path": ["00003.jpg", "00004.jpg", "00005.jpg", "00006.jpg"],
         "rank": [2, 1, 4, 3], "raw_annotations": [[2, 1, 4, 3]]},
    ]  # fmt: skip
    write_files(folder, {path: picture() for record in records for path in record["image_path"]})
    (folder / "test.json").write_text(json.dumps(records))

    folder = root / "hpdv3"
    records = []
    for i, prompt in enumerate(("a dog in a park", "a dog in a park", "a robot holding a cup")):
        chosen, rejected = make_tiny_image_pair(rng, size)
        paths = [f"images/{i}-a.png", f"images/{i}-b.png"]
        write_files(folder, {paths[0]: chosen, **({paths[1]: rejected} if i != 1 else {})})
        records.append(
            {
                "prompt": prompt,
                "path1": paths[0],
                "path2": paths[1],
                "model1": "flux",
                "model2": "sd3",
                "choice_dist": None,
                "confidence": None,
            }
        )
    (folder / "test.json").write_text(json.dumps(records))

    votes = ("leftvote", "rightvote", "tievote", "bothbad_vote", "leftvote")
    columns: dict[str, list[Any]] = {
        "prompt": [],
        "left_model": [],
        "left_image": [],
        "right_model": [],
        "right_image": [],
        "vote_type": [],
    }
    for i, vote in enumerate(votes):
        chosen, rejected = make_tiny_image_pair(rng, size)
        left, right = (rejected, chosen) if vote == "rightvote" else (chosen, rejected)
        for key, value in zip(
            columns,
            (
                _PAIR_PROMPTS[i % 3],
                "sdxl",
                {"bytes": _encode_image(left), "path": None},
                "flux",
                {"bytes": _encode_image(right), "path": None},
                vote,
            ),
        ):
            columns[key].append(value)
    features = datasets.Features(
        {name: datasets.Image() if name.endswith("_image") else datasets.Value("string") for name in columns}
    )
    (root / "genai_bench").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(root / "genai_bench" / "test.parquet"))

    labels = ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 0.0))
    columns = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": [], "model_0": [], "model_1": []}
    for i, (label_0, label_1) in enumerate(labels):
        chosen, rejected = (_encode_image(im, "JPEG") for im in make_tiny_image_pair(rng, size))
        first, second = (rejected, chosen) if label_1 > label_0 else (chosen, rejected)
        if i == 3:
            second = second[:40]
        for key, value in zip(columns, (_PAIR_PROMPTS[3 + i % 3], first, second, label_0, label_1, "sd3", "sdxl")):
            columns[key].append(value)
    features = datasets.Features(
        {
            **{name: datasets.Value("string") for name in ("caption", "model_0", "model_1")},
            "jpg_0": datasets.Value("binary"),
            "jpg_1": datasets.Value("binary"),
            "label_0": datasets.Value("float64"),
            "label_1": datasets.Value("float64"),
        }
    )
    table = datasets.Dataset.from_dict(columns, features=features)
    (root / "pickapic_v2" / "data").mkdir(parents=True, exist_ok=True)
    table.to_parquet(str(root / "pickapic_v2" / "data" / "test_unique-00000-of-00001.parquet"))
    table.select([0, 1]).to_parquet(str(root / "pickapic_v2" / "data" / "test-00000-of-00001.parquet"))
    return str(root)
