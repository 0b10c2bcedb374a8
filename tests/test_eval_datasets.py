"""Benchmark adapters on tiny copies in each published layout; accuracies checked against hand counts."""

import io
import json
import logging
import os
import tarfile


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import huggingface_hub
import pytest
from PIL import Image

from dinalrm.data import FIRST, SECOND, TIE
from dinalrm.data.benchmarks import BenchmarkPair, collect_scores, load_benchmark
from dinalrm.evaluation.common import benchmark_accuracy, compute_accuracy


def save(path, color=(0, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)


def jpeg(red: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (red, 0, 0)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def red_score(prompts, images):
    """A stand-in reward model: the mean red level of the image."""
    return [sum(image.getpixel((8, 8))[:1]) / 255 for image in images]


def scores_for(benchmark, by_suffix):
    """Scores keyed by image id, given per image-path suffix (the ids embed the listed path)."""
    return {image_id: by_suffix[image_id.split("/", 1)[1]] for image_id in benchmark.images}


# --- ImageReward ----------------------------------------------------------------------------------


@pytest.fixture
def imagereward_dir(tmp_path):
    root = tmp_path / "bench" / "imagereward"
    records = [
        {"id": "000001-0001", "prompt": "a red fox",
         "generations": ["part-1/a.webp", "part-1/b.webp", "part-1/c.webp", "part-1/d.webp"],
         "ranking": [1, 2, 2, 3]},
        {"id": "000002-0002", "prompt": "a blue owl",
         "generations": ["part-2/e.webp", "part-2/f.webp", "part-2/g.webp", "part-2/missing.webp"],
         "ranking": [3, 1, 2, 4]},
    ]  # fmt: skip
    for record in records:
        for path in record["generations"]:
            if "missing" not in path:
                save(root / path)
    root.mkdir(parents=True, exist_ok=True)
    (root / "test.json").write_text(json.dumps(records))
    return tmp_path / "bench"


def test_imagereward_pairs_ties_and_micro_accuracy(imagereward_dir):
    bench = load_benchmark("imagereward", str(imagereward_dir))
    assert bench.averaging == "micro" and bench.split == "test"
    # Prompt 1 ranks [1, 2, 2, 3]: 6 pairs, (b, c) tied -> 5 pairs + 1 dropped tie.
    # Prompt 2 ranks [3, 1, 2, 4]: 6 pairs, none tied; 3 involve the missing image.
    assert len(bench.pairs) == 11 and bench.n_gt_ties_dropped == 1
    assert bench.n_missing_images == 1 and len(bench.images) == 7
    p1, p2 = "000001-0001", "000002-0002"
    assert bench.pairs[0] == BenchmarkPair(p1, f"{p1}/part-1/a.webp", f"{p1}/part-1/b.webp", FIRST)
    assert bench.pairs[5] == BenchmarkPair(p2, f"{p2}/part-2/e.webp", f"{p2}/part-2/f.webp", SECOND)
    scores = scores_for(bench, {
        "part-1/a.webp": 0.9, "part-1/b.webp": 0.5, "part-1/c.webp": 0.7, "part-1/d.webp": 0.5,
        "part-2/e.webp": 0.1, "part-2/f.webp": 0.3, "part-2/g.webp": 0.2,
    })  # fmt: skip
    result = benchmark_accuracy(bench, scores)
    # Prompt 1: a>b a>c a>d right, b=d score tie (wrong), c>d right -> 4/5. Prompt 2: f>e, g>e, f>g -> 3/3.
    expected = {
        "accuracy": 7 / 8, "n_pairs": 8, "n_correct": 7, "n_wrong": 0, "n_score_ties": 1, "n_gt_ties_dropped": 1,
        "n_gt_ties_credited": 0, "n_missing_images": 1, "n_pairs_missing_image": 3, "n_groups": 2,
        "averaging": "micro",
    }  # fmt: skip
    assert {key: result[key] for key in expected} == expected
    # HPSv2's variant of the ImageReward metric: macro over prompts, ties dropped -> (4/5 + 3/3) / 2.
    assert compute_accuracy(bench.pairs, scores, "macro")["accuracy"] == pytest.approx(0.9)


# --- HPDv2 ----------------------------------------------------------------------------------------

HPDV2_RECORDS = [
    {"prompt": "a castle", "image_path": ["00000.jpg", "00001.jpg", "00002.jpg"], "rank": [1, 2, 2],
     "raw_annotations": [[1, 2, 3]]},
    {"prompt": "a boat", "image_path": ["00003.jpg", "00004.jpg", "00005.jpg", "00006.jpg"], "rank": [2, 1, 4, 3],
     "raw_annotations": [[2, 1, 4, 3]]},
]  # fmt: skip
HPDV2_SCORES = {
    "00000.jpg": 0.2, "00001.jpg": 0.5, "00002.jpg": 0.1,
    "00003.jpg": 0.6, "00004.jpg": 0.8, "00005.jpg": 0.1, "00006.jpg": 0.1,
}  # fmt: skip


def check_hpdv2(bench):
    assert bench.averaging == "macro" and len(bench.pairs) == 3 + 6 and bench.n_gt_ties_dropped == 0
    assert [p.label for p in bench.pairs[:3]] == [FIRST, FIRST, TIE]  # the GT tie is kept, to be credited
    result = benchmark_accuracy(bench, scores_for(bench, HPDV2_SCORES))
    # HPSv2 inversion score per prompt, by hand:
    # castle: predicted order 00001 > 00000 > 00002; (0,1) discordant, (0,2) concordant, (1,2) GT tie never
    #   discordant -> 1 - 1/3 = 2/3.
    # boat: (0,1) 0.8 > 0.6 right; (0,2) (0,3) (1,2) (1,3) right; (2,3) GT says 3 over 2, scores tie -> wrong
    #   -> 5/6.  Macro = (2/3 + 5/6) / 2 = 3/4; micro would be (2 + 5) / 9 = 7/9.
    assert result["accuracy"] == pytest.approx(0.75)
    counts = (result["n_pairs"], result["n_correct"], result["n_score_ties"], result["n_gt_ties_credited"])
    assert counts == (9, 7, 1, 1)
    assert compute_accuracy(bench.pairs, scores_for(bench, HPDV2_SCORES), "micro")["accuracy"] == pytest.approx(7 / 9)


def test_hpdv2_local_macro_with_credited_ties(tmp_path):
    root = tmp_path / "hpdv2"
    for record in HPDV2_RECORDS:
        for path in record["image_path"]:
            save(root / path)
    (root / "test.json").write_text(json.dumps(HPDV2_RECORDS))
    check_hpdv2(load_benchmark("hpdv2", str(tmp_path)))


def test_hpdv2_from_hub_archive(tmp_path, monkeypatch):
    """The Hub path downloads test.json + test.tar.gz; the tarball nests images under test/."""
    staging = tmp_path / "staging"
    for record in HPDV2_RECORDS:
        for path in record["image_path"]:
            save(staging / "test" / path)
    (staging / "test.json").write_text(json.dumps(HPDV2_RECORDS))
    with tarfile.open(staging / "test.tar.gz", "w:gz") as archive:
        archive.add(staging / "test", arcname="test")
    calls = []

    def fake_download(repo_id, filename, repo_type=None, cache_dir=None):
        calls.append((repo_id, filename, repo_type))
        return str(staging / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    check_hpdv2(load_benchmark("hpdv2", cache_dir=str(tmp_path / "cache")))
    assert calls == [("ymhao/HPDv2", "test.json", "dataset"), ("ymhao/HPDv2", "test.tar.gz", "dataset")]


# --- HPDv3 ----------------------------------------------------------------------------------------


def test_hpdv3_path1_preferred_micro(tmp_path):
    root = tmp_path / "hpdv3"
    for name in ("1", "2", "3", "4"):
        save(root / "images" / f"{name}.png")
    rows = [("a cat", "1", "2"), ("a cat", "1", "3"), ("a dog", "1", "4")]
    records = [
        {"prompt": p, "path1": f"images/{a}.png", "path2": f"images/{b}.png", "model1": "flux", "model2": "sd3",
         "choice_dist": [4, 1], "confidence": 0.97}
        for p, a, b in rows
    ]  # fmt: skip
    (root / "test.json").write_text(json.dumps(records))
    bench = load_benchmark("hpdv3", str(tmp_path))
    assert [p.label for p in bench.pairs] == [FIRST] * 3
    assert len(bench.images) == 5  # images/1.png is shared within "a cat" but scored separately for "a dog"
    assert bench.pairs[1].image_a == bench.pairs[0].image_a != bench.pairs[2].image_a
    prompts = {image.prompt for image in bench.images.values()}
    assert prompts == {"a cat", "a dog"}
    scores = {"p0/images/1.png": 1.0, "p0/images/2.png": 0.0, "p0/images/3.png": 2.0,
              "p1/images/1.png": 0.5, "p1/images/4.png": 0.5}  # fmt: skip
    result = benchmark_accuracy(bench, scores)
    assert (result["accuracy"], result["n_correct"], result["n_score_ties"]) == (1 / 3, 1, 1)
    with pytest.raises(ValueError, match="image_root"):
        load_benchmark("hpdv3")  # the Hub JSON alone cannot locate the images


# --- GenAI-Bench ----------------------------------------------------------------------------------


def genai_table():
    features = datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "left_model": datasets.Value("string"),
            "left_image": datasets.Image(),
            "right_model": datasets.Value("string"),
            "right_image": datasets.Image(),
            "vote_type": datasets.Value("string"),
        }
    )
    rows = [
        ("a tree", 200, 100, "leftvote"),
        ("a tree", 50, 150, "rightvote"),
        ("a lake", 90, 90, "tievote"),
        ("a lake", 90, 10, "bothbad_vote"),
        ("a road", 80, 80, "leftvote"),  # equal reds -> score tie -> wrong
    ]
    image = lambda red: {"bytes": jpeg(red), "path": None}  # noqa: E731
    return datasets.Dataset.from_dict(
        {
            "prompt": [r[0] for r in rows],
            "left_model": ["m1"] * 5,
            "left_image": [image(r[1]) for r in rows],
            "right_model": ["m2"] * 5,
            "right_image": [image(r[2]) for r in rows],
            "vote_type": [r[3] for r in rows],
        },
        features=features,
    )


def test_genai_bench_local_parquet_end_to_end(tmp_path):
    folder = tmp_path / "genai_bench"
    folder.mkdir()
    genai_table().to_parquet(str(folder / "test.parquet"))
    bench = load_benchmark("genai_bench", str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert [p.label for p in bench.pairs] == [FIRST, SECOND, FIRST]
    assert bench.n_gt_ties_dropped == 1 and bench.stats["both_bad"] == 1 and len(bench.images) == 6
    scores, stats = collect_scores(bench, red_score, batch_size=4)
    assert stats.kept == 6 and stats.n_skipped == 0
    result = benchmark_accuracy(bench, scores)
    assert (result["accuracy"], result["n_pairs"], result["n_score_ties"], result["n_gt_ties_dropped"]) == (
        2 / 3, 3, 1, 1,
    )  # fmt: skip


def test_genai_bench_hub_call(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, cache_dir=None):
        calls.append((path, name, split))
        return genai_table()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    bench = load_benchmark("genai_bench", split="test_v1")
    assert calls == [("TIGER-Lab/GenAI-Bench", "image_generation", "test_v1")]
    assert len(bench.pairs) == 3


# --- Pick-a-Pic v2 --------------------------------------------------------------------------------


def pickapic_table(rows):
    features = datasets.Features(
        {
            "caption": datasets.Value("string"),
            "jpg_0": datasets.Value("binary"),
            "jpg_1": datasets.Value("binary"),
            "label_0": datasets.Value("float64"),
            "label_1": datasets.Value("float64"),
        }
    )
    names = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    return datasets.Dataset.from_dict({n: [r[i] for r in rows] for i, n in enumerate(names)}, features=features)


def test_pickapic_splits_ties_and_corrupt_images(tmp_path, caplog):
    data = tmp_path / "pickapic_v2" / "data"
    data.mkdir(parents=True)
    unique = [
        ("a cup", jpeg(200), jpeg(100), 1.0, 0.0),
        ("a cup", jpeg(30), jpeg(60), 0.0, 1.0),
        ("a pen", jpeg(30), jpeg(60), 0.5, 0.5),
        ("a hat", jpeg(200), b"\xff\xd8\xffnot really a jpeg", 1.0, 0.0),
    ]
    pickapic_table(unique).to_parquet(str(data / "test_unique-00000-of-00001.parquet"))
    pickapic_table(unique[:1] * 2).to_parquet(str(data / "test-00000-of-00001.parquet"))

    bench = load_benchmark("pickapic_v2", str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert bench.split == "test_unique" and [p.label for p in bench.pairs] == [FIRST, SECOND, FIRST]
    assert bench.n_gt_ties_dropped == 1
    with caplog.at_level(logging.WARNING, logger="dinalrm.data.benchmarks"):
        scores, stats = collect_scores(bench, red_score)
    assert stats["corrupt_image"] == 1 and stats.kept == 5
    assert "images scored: kept 5, skipped 1 (corrupt_image=1)" in caplog.text
    result = benchmark_accuracy(bench, scores)
    assert (result["accuracy"], result["n_pairs"], result["n_missing_images"], result["n_pairs_missing_image"]) == (
        1.0, 2, 1, 1,
    )  # fmt: skip

    full = load_benchmark("pickapic_v2", str(tmp_path), split="test", cache_dir=str(tmp_path / "cache"))
    assert len(full.pairs) == 2


# --- errors ----------------------------------------------------------------------------------------


def test_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="Unknown benchmark"):
        load_benchmark("drawbench")
    with pytest.raises(FileNotFoundError, match="hpdv2"):
        load_benchmark("hpdv2", str(tmp_path))
    with pytest.raises(ValueError, match="averaging"):
        compute_accuracy([], {}, "weighted")
    with pytest.raises(ValueError, match="Non-finite"):
        compute_accuracy([("g", "a", "b", FIRST)], {"a": float("nan"), "b": 0.0})
    empty = compute_accuracy([("g", "a", "b", FIRST)], {})
    assert empty["n_pairs"] == 0 and empty["n_missing_images"] == 2 and empty["accuracy"] != empty["accuracy"]


def test_bad_benchmark_rows_are_skipped_and_counted_never_fatal(tmp_path, caplog):
    """Missing keys, null prompts, ranks that are not numbers: counted; ranks as strings compare as numbers."""
    root = tmp_path / "hpdv2"
    for name in ("a", "b", "c"):
        save(root / f"{name}.jpg")
    save(tmp_path / "outside.jpg")
    records = [
        {"prompt": "good", "image_path": ["a.jpg", "b.jpg", "c.jpg"], "rank": ["10", "9", "2"]},
        {"image_path": ["a.jpg", "b.jpg"], "rank": [1, 2]},  # no prompt
        {"prompt": None, "image_path": ["a.jpg", "b.jpg"], "rank": [1, 2]},
        {"prompt": "no ranks", "image_path": ["a.jpg", "b.jpg"]},
        {"prompt": "text ranks", "image_path": ["a.jpg", "b.jpg"], "rank": ["first", "second"]},
        {"prompt": "escapes", "image_path": ["a.jpg", "../outside.jpg"], "rank": [1, 2]},
        "not a record",
    ]
    (root / "test.json").write_text(json.dumps(records))
    with caplog.at_level(logging.WARNING):
        bench = load_benchmark("hpdv2", str(tmp_path))
    assert bench.stats["malformed_record"] == 5
    assert bench.n_missing_images == 1  # the path leaving the benchmark's root is never read
    good = [p for p in bench.pairs if p.group_id == "0"]
    # ranks "10", "9", "2" are numbers: c (2) beats b (9) beats a (10); as strings "10" < "2" < "9" would say a wins
    labels = {(p.image_a.split("/")[1], p.image_b.split("/")[1]): p.label for p in good}
    assert labels == {("a.jpg", "b.jpg"): SECOND, ("a.jpg", "c.jpg"): SECOND, ("b.jpg", "c.jpg"): SECOND}


def test_an_unreadable_benchmark_json_is_reported_with_its_name(tmp_path):
    (tmp_path / "hpdv3").mkdir()
    (tmp_path / "hpdv3" / "test.json").write_text('[{"prompt": "a", "pa')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'hpdv3' / 'test.json'} is not valid JSON"):
        load_benchmark("hpdv3", str(tmp_path))
