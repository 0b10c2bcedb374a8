"""Image decoding, aspect-ratio buckets and the training-pair adapters, on tiny datasets in the real schemas."""

import io
import json
import logging
import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import numpy as np
import pytest
from PIL import Image

from dinalrm.data import (
    ColumnNames,
    detect_format,
    load_preference_dataset,
    resize_and_center_crop,
    write_canonical_pairs,
)
from dinalrm.data.images import CORRUPT, MISSING, ImageLoadError, load_image, read_image_size
from dinalrm.training.buckets import ASPECT_RATIO_BUCKETS, BucketSet


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def solid(size=(48, 32), color=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def truncated_jpeg(size=(64, 64)) -> bytes:
    """A noisy JPEG cut in the middle of its entropy-coded data: valid header, broken pixels."""
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    return data[: len(data) // 2]


# --- images -------------------------------------------------------------------------------------


def test_load_image_accepts_every_source_form(tmp_path):
    image = solid()
    path = tmp_path / "a.png"
    image.save(path)
    data = encode(image)
    for source in (str(path), path, data, {"bytes": data, "path": None}, {"bytes": None, "path": str(path)}, image):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (48, 32)
        assert loaded.getpixel((0, 0)) == (200, 30, 30)
    assert load_image("a.png", root=tmp_path).size == (48, 32)


def test_modes_are_converted_to_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red pixels
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = load_image(encode(rgba))
    assert out.getpixel((1, 1)) == (255, 255, 255)  # composited on white, not red
    assert out.getpixel((0, 0)) == (0, 0, 255)

    grey16 = Image.fromarray(np.array([[0, 32896, 65535, 257]], dtype=np.uint16))
    assert grey16.mode == "I;16"
    out = load_image(encode(grey16))
    assert [out.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255), (1, 1, 1)]

    assert load_image(encode(Image.new("L", (3, 3), 77))).getpixel((0, 0)) == (77, 77, 77)

    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    out = load_image(encode(palette))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (40, 50, 60)

    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert load_image(encode(cmyk, "JPEG")).mode == "RGB"


def test_exif_rotation_is_applied_to_size_and_pixels():
    image = solid((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    assert read_image_size(buffer.getvalue()) == (20, 40)
    assert load_image(buffer.getvalue()).size == (20, 40)


def test_bad_images_raise_typed_errors(tmp_path):
    with pytest.raises(ImageLoadError) as err:
        load_image(tmp_path / "nope.png")
    assert err.value.reason == MISSING and isinstance(err.value, ValueError)
    for empty in (None, b"", {"bytes": None, "path": None}):
        with pytest.raises(ImageLoadError) as err:
            load_image(empty)
        assert err.value.reason == MISSING
    with pytest.raises(ImageLoadError) as err:
        load_image(b"definitely not an image")
    assert err.value.reason == CORRUPT
    truncated = truncated_jpeg()
    assert read_image_size(truncated) == (64, 64)  # the header is intact ...
    with pytest.raises(ImageLoadError) as err:
        load_image(truncated)  # ... the pixels are not
    assert err.value.reason == CORRUPT
    with pytest.raises(TypeError):
        load_image(42)


# --- buckets ------------------------------------------------------------------------------------


def test_default_buckets_are_the_design_list():
    assert BucketSet(1024, 16).buckets == ASPECT_RATIO_BUCKETS
    assert BucketSet(512, 16).buckets[:3] == ((512, 512), (624, 416), (416, 624))


def test_buckets_are_scaled_and_snapped_to_the_multiple():
    # resolution 256 = 1/4 of 1024; 1248x832 -> 312x208 -> snapped to 32: 320x224 (9.75 -> 10, 6.5 -> 7).
    buckets = BucketSet(256, 32).buckets
    assert buckets[:4] == ((256, 256), (320, 224), (224, 320), (352, 224))
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in buckets)
    assert (128, 128) in buckets and (64, 64) in buckets


def test_assign_bucket_picks_closest_ratio_then_closest_area():
    buckets = BucketSet(1024, 16)
    assert buckets.assign_bucket(1000, 1000) == (1024, 1024)
    assert buckets.assign_bucket(600, 600) == (512, 512)  # ln(600²/512²)=0.32 < ln(1024²/600²)=1.07
    assert buckets.assign_bucket(3000, 2000) == (1344, 896)  # 3:2 class, larger member is closer in area
    assert buckets.assign_bucket(1900, 1000) == (1472, 832)  # ratio 1.9: 1472/832=1.77 is closest
    assert buckets.assign_bucket(400, 300) == (1024, 768)
    assert buckets.assign_bucket(832, 1472) == (832, 1472)
    assert buckets.assign_pair((1024, 1024), (1024, 1024)) == (1024, 1024)
    assert buckets.assign_pair((1024, 1024), (256, 256)) == (512, 512)  # geometric mean of the areas
    assert buckets.assign_pair((1024, 1024), (1248, 832)) is None
    with pytest.raises(ValueError):
        buckets.assign_bucket(0, 10)
    with pytest.raises(ValueError):
        BucketSet(1024, 0)


def test_resize_and_center_crop():
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (100, 0, 200, 100))  # right half blue
    out = resize_and_center_crop(image, (50, 50))  # 200x100 -> 100x50 -> crop x in [25, 75)
    assert out.size == (50, 50)
    assert out.getpixel((5, 25)) == (255, 0, 0) and out.getpixel((45, 25)) == (0, 0, 255)
    assert resize_and_center_crop(solid((10, 20)), (40, 40)).size == (40, 40)


# --- format detection ---------------------------------------------------------------------------


def test_detect_format():
    assert detect_format(["prompt", "chosen", "rejected", "weight"]) == "canonical"
    assert detect_format(["prompt", "path1", "path2", "model1", "model2", "choice_dist", "confidence"]) == "hpdv3"
    assert detect_format(["caption", "jpg_0", "jpg_1", "label_0", "label_1", "model_0"]) == "pickapic"
    assert detect_format(["text", "win", "lose"], ColumnNames(prompt="text", chosen="win", rejected="lose")) == (
        "canonical"
    )
    with pytest.raises(ValueError, match=r"\['image', 'text'\].*hpdv3: prompt, path1, path2"):
        detect_format(["text", "image"])


def test_unknown_columns_error_names_them(tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": ["a"], "picture": ["x.png"]}).to_parquet(str(folder / "train.parquet"))
    with pytest.raises(ValueError, match="picture"):
        load_preference_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"needs columns \['caption'"):
        load_preference_dataset(train_data_dir=str(folder), data_format="pickapic", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="exactly one"):
        load_preference_dataset()


# --- adapters -----------------------------------------------------------------------------------


@pytest.fixture
def hpdv3_dir(tmp_path):
    """HPDv3's published layout: train.json (a JSON list) + images relative to the folder."""
    root = tmp_path / "hpdv3"
    (root / "images" / "sd").mkdir(parents=True)
    solid((64, 64), (250, 0, 0)).save(root / "images/sd/a.png")
    solid((64, 64), (0, 250, 0)).save(root / "images/sd/b.jpg", "JPEG")
    solid((96, 64), (0, 0, 250)).save(root / "images/sd/wide.png")
    (root / "images/sd/trunc.jpg").write_bytes(truncated_jpeg())
    rows = [
        # prompt, path1 (preferred), path2, confidence
        ("cat", "images/sd/a.png", "images/sd/b.jpg", 0.99),
        ("dog", "images/sd/b.jpg", "images/sd/a.png", 0.50),  # low confidence
        ("owl", "images/sd/a.png", "images/sd/b.jpg", None),  # null confidence
        ("fox", "images/sd/a.png", "images/sd/gone.png", 0.97),  # missing file
        ("emu", "images/sd/trunc.jpg", "images/sd/a.png", 0.98),  # truncated JPEG
        ("yak", "images/sd/a.png", "images/sd/wide.png", 0.96),  # 1:1 vs 3:2 -> different buckets
    ]
    records = [
        {"prompt": p, "path1": a, "path2": b, "model1": "m1", "model2": "m2",
         "choice_dist": None if c is None else [3, 1], "confidence": c}
        for p, a, b, c in rows
    ]  # fmt: skip
    (root / "train.json").write_text(json.dumps(records))
    return root


def test_hpdv3_adapter_counts_every_skip(hpdv3_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dinalrm.data"):
        ds, stats = load_preference_dataset(
            train_data_dir=str(hpdv3_dir), min_confidence=0.95, cache_dir=str(tmp_path / "cache"),
            buckets=BucketSet(64, 16),
        )  # fmt: skip
    assert ds.column_names == ["prompt", "chosen", "rejected", "weight", "bucket_width", "bucket_height"]
    assert ds["prompt"] == ["cat", "owl"]  # null confidence kept by default
    row = ds[0]
    assert row["chosen"]["path"] == str(hpdv3_dir / "images/sd/a.png")  # path1 is always the preferred image
    assert row["rejected"]["path"] == str(hpdv3_dir / "images/sd/b.jpg")
    assert (row["bucket_width"], row["bucket_height"], row["weight"]) == (64, 64, 1.0)
    assert load_image(row["chosen"]).getpixel((0, 0)) == (250, 0, 0)
    assert stats.kept == 2
    assert dict(stats.skipped) == {"low_confidence": 1, "missing_image": 1, "corrupt_image": 1, "bucket_mismatch": 1}
    assert "kept 2, skipped 4" in caplog.text and "missing_image=1" in caplog.text


def test_hpdv3_confidence_flags_and_header_only_check(hpdv3_dir, tmp_path):
    ds, stats = load_preference_dataset(
        train_data_dir=str(hpdv3_dir), min_confidence=0.95, keep_null_confidence=False, decode_check=False,
        cache_dir=str(tmp_path / "cache"), buckets=BucketSet(64, 16),
    )  # fmt: skip
    assert ds["prompt"] == ["cat", "emu"]  # header-only check lets the truncated JPEG through
    assert stats["null_confidence"] == 1 and stats["corrupt_image"] == 0
    ds, stats = load_preference_dataset(
        train_data_dir=str(hpdv3_dir), data_format="hpdv3", max_samples=3, cache_dir=str(tmp_path / "cache")
    )
    assert ds["prompt"] == ["cat", "dog", "owl"] and stats.n_skipped == 0  # no threshold: all kept


def pickapic_table(rows) -> datasets.Dataset:
    """Pick-a-Pic v2's columns and types: raw JPEG bytes, float labels."""
    features = datasets.Features(
        {
            "caption": datasets.Value("string"),
            "jpg_0": datasets.Value("binary"),
            "jpg_1": datasets.Value("binary"),
            "label_0": datasets.Value("float64"),
            "label_1": datasets.Value("float64"),
            "model_0": datasets.Value("string"),
            "model_1": datasets.Value("string"),
        }
    )
    names = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    columns = {name: [row[i] for row in rows] for i, name in enumerate(names)}
    columns.update(model_0=["sdxl"] * len(rows), model_1=["sd15"] * len(rows))
    return datasets.Dataset.from_dict(columns, features=features)


def test_pickapic_adapter_orders_pairs_and_drops_ties(tmp_path):
    red, blue = encode(solid((32, 32), (220, 0, 0)), "JPEG"), encode(solid((32, 32), (0, 0, 220)), "JPEG")
    table = pickapic_table(
        [
            ("left wins", red, blue, 1.0, 0.0),
            ("right wins", red, blue, 0.0, 1.0),
            ("tie", red, blue, 0.5, 0.5),
            ("broken", red, b"\xff\xd8\xff garbage", 1.0, 0.0),
            ("unlabelled", red, blue, 0.0, 0.0),
        ]
    )
    folder = tmp_path / "pickapic"
    (folder / "data").mkdir(parents=True)
    table.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    ds, stats = load_preference_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    assert ds["prompt"] == ["left wins", "right wins"]
    assert ds[0]["chosen"]["bytes"] == red and ds[0]["rejected"]["bytes"] == blue
    assert ds[1]["chosen"]["bytes"] == blue and ds[1]["rejected"]["bytes"] == red
    assert (ds[0]["bucket_width"], ds[0]["bucket_height"]) == (256, 256)  # 32² images: the smallest square bucket
    assert dict(stats.skipped) == {"gt_tie": 1, "corrupt_image": 1, "invalid_label": 1}


def test_canonical_adapter_with_image_features_and_custom_columns(tmp_path):
    png = encode(solid((40, 40)))
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "win": datasets.Image(),
            "lose": datasets.Image(),
            "w": datasets.Value("float32"),
        }
    )
    table = datasets.Dataset.from_dict(
        {
            "text": ["good", "  ", "bad weight", "no image"],
            "win": [{"bytes": png, "path": None}] * 4,
            "lose": [{"bytes": png, "path": None}] * 3 + [None],
            "w": [0.5, 1.0, float("nan"), 1.0],
        },
        features=features,
    )
    folder = tmp_path / "canon"
    folder.mkdir()
    table.to_parquet(str(folder / "train.parquet"))
    columns = {"prompt": "text", "chosen": "win", "rejected": "lose", "weight": "w"}
    ds, stats = load_preference_dataset(train_data_dir=str(folder), columns=columns, cache_dir=str(tmp_path / "c"))
    assert ds["prompt"] == ["good"] and ds["weight"] == [0.5]
    assert ds.features["chosen"] == datasets.Image(decode=False)
    assert dict(stats.skipped) == {"empty_prompt": 1, "invalid_weight": 1, "missing_image": 1}
    assert stats.as_dict() == {"kept": 1, "skipped": 3, "empty_prompt": 1, "invalid_weight": 1, "missing_image": 1}


def test_canonical_paths_resolve_against_image_root(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    solid((16, 16)).save(images / "x.png")
    solid((16, 16), (0, 0, 0)).save(images / "y.png")
    folder = tmp_path / "pairs"
    folder.mkdir()
    datasets.Dataset.from_dict({"prompt": ["p"], "chosen": ["x.png"], "rejected": ["y.png"]}).to_parquet(
        str(folder / "train.parquet")
    )
    ds, stats = load_preference_dataset(
        train_data_dir=str(folder), image_root=str(images), cache_dir=str(tmp_path / "c")
    )
    assert ds[0]["chosen"]["path"] == str(images / "x.png") and stats.kept == 1 and stats.n_skipped == 0


def test_hpdv3_from_the_hub_reads_the_split_json(hpdv3_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="image_root"):
        load_preference_dataset("MizzenAI/HPDv3")  # fails before any download
    calls = []
    real_load_dataset = datasets.load_dataset

    def fake_load_dataset(path, name=None, data_files=None, split=None, cache_dir=None):
        calls.append((path, name, data_files, split))
        return real_load_dataset("json", data_files=str(hpdv3_dir / "train.json"), split="train", cache_dir=cache_dir)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds, _ = load_preference_dataset(
        "MizzenAI/HPDv3", image_root=str(hpdv3_dir), max_samples=1, cache_dir=str(tmp_path / "cache")
    )
    assert calls == [("MizzenAI/HPDv3", None, {"train": "train.json"}, "train")]
    assert ds["prompt"] == ["cat"]


def test_write_canonical_pairs_round_trips_through_the_reader(tmp_path):
    red, blue = solid((40, 40)), solid((40, 40), (20, 40, 220))
    rows = [
        {"prompt": "a red square", "chosen": red, "rejected": blue, "weight": 0.5, "source": "a"},
        {"prompt": "a blue square", "chosen": blue, "rejected": red, "weight": 2.0, "source": "b"},
    ]
    folder = write_canonical_pairs(tmp_path / "pairs", rows, split="test")
    assert os.listdir(folder) == ["test.parquet"]
    table = datasets.load_dataset("parquet", data_files=os.path.join(folder, "test.parquet"), split="train")
    assert table.features["chosen"] == datasets.Image() and table.features["weight"] == datasets.Value("float32")
    assert table["source"] == ["a", "b"]  # extra keys become extra columns
    ds, stats = load_preference_dataset(train_data_dir=folder, split="test", cache_dir=str(tmp_path / "c"))
    assert ds["prompt"] == ["a red square", "a blue square"] and ds["weight"] == [0.5, 2.0]
    assert stats.as_dict() == {"kept": 2, "skipped": 0}
    chosen = load_image(ds[0]["chosen"])
    assert chosen.getpixel((0, 0)) == (200, 30, 30)


def test_image_paths_that_leave_the_dataset_root_are_skipped_and_counted(hpdv3_dir, tmp_path):
    outside = tmp_path / "secret.png"  # a readable image next to the dataset, never named by it legitimately
    solid((64, 64)).save(outside)
    rows = [
        {"prompt": "cat", "path1": "images/sd/a.png", "path2": "images/sd/b.jpg", "confidence": 0.99},
        {"prompt": "dog", "path1": "../secret.png", "path2": "images/sd/a.png", "confidence": 0.99},
        {"prompt": "owl", "path1": "images/sd/a.png", "path2": "images/../../secret.png", "confidence": 0.99},
    ]
    (hpdv3_dir / "train.json").write_text(json.dumps(rows))
    ds, stats = load_preference_dataset(
        train_data_dir=str(hpdv3_dir), cache_dir=str(tmp_path / "cache"), buckets=BucketSet(64, 16)
    )
    assert ds["prompt"] == ["cat"]
    assert dict(stats.skipped) == {"path_outside_root": 2}


@pytest.mark.parametrize("content, problem", [("", "is empty"), ('[{"prompt": "cat", "path1": "a', "cannot be read")])
def test_an_empty_or_truncated_training_json_is_refused_by_name(tmp_path, content, problem):
    (tmp_path / "train.json").write_text(content)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'train.json'} {problem}.*truncated"):
        load_preference_dataset(train_data_dir=str(tmp_path), data_format="hpdv3", cache_dir=str(tmp_path / "c"))
