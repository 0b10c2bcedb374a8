"""dinalrm/evaluation/manifests.py and `run_eval.py --manifests`: split manifests built from tiny local copies of
the benchmarks in their published schemas, and a copy with one altered and one missing file checked against one."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from dinalrm.data.benchmarks import load_benchmark
from dinalrm.evaluation import manifests
from dinalrm.evaluation import runner as run_eval
from dinalrm.testing import save_tiny_clip, write_tiny_benchmarks


pytestmark = pytest.mark.usefixtures("one_thread")

SPLITS = [("imagereward", "test"), ("hpdv2", "test"), ("hpdv3", "test"), ("genai_bench", "test"),
          ("pickapic_v2", "test_unique"), ("pickapic_v2", "test")]  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifests")
    data = write_tiny_benchmarks(root / "data")
    out = root / "manifests"
    spec = ",".join(f"{name}:{split}" for name, split in SPLITS)
    argv = ["--benchmarks", spec, "--data_dir", data, "--revision", "abc123", "--output_dir", str(out)]
    argv += ["--cache_dir", str(root / "cache")]
    assert manifests.main(argv) == 0
    return {"root": root, "data": Path(data), "manifests": out, "clip": save_tiny_clip(root / "tiny-clip")}


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("name, split", SPLITS)
def test_builder_writes_header_images_with_checksums_and_pairs(built, name, split):
    records = lines(built["manifests"] / f"{name}-{split}.jsonl")
    header, images = records[0], [r for r in records[1:] if "image" in r]
    pairs = [r["pair"] for r in records[1:] if "pair" in r]
    assert header["format"] == "dinalrm-split-manifest/1"
    assert (header["benchmark"], header["split"], header["revision"]) == (name, split, "abc123")
    assert header["dataset_id"] == {"imagereward": "THUDM/ImageRewardDB", "hpdv2": "ymhao/HPDv2",
                                    "hpdv3": "MizzenAI/HPDv3", "genai_bench": "TIGER-Lab/GenAI-Bench",
                                    "pickapic_v2": "yuvalkirstain/pickapic_v2"}[name]  # fmt: skip
    assert header["config"] == ("image_generation" if name == "genai_bench" else None)
    loaded = load_benchmark(name, str(built["data"]), split=split, cache_dir=str(built["root"] / "cache"))
    assert [tuple(p) for p in pairs] == [tuple(p) for p in loaded.pairs] and header["n_pairs"] == len(pairs)
    assert {image for pair in pairs for image in pair[1:3]} == {r["image"] for r in images}
    for record in images:
        if name in ("imagereward", "hpdv2", "hpdv3") and record["sha256"] is not None:
            # Files: the checksum of the file's bytes, named by the path the benchmark lists.
            data = (built["data"] / name / record["file"]).read_bytes()
            assert record["sha256"] == hashlib.sha256(data).hexdigest()
    # The files the tiny copies lack on purpose (ImageReward's 4th image of prompt 2, HPDv3's missing path2).
    absent = [r["file"] for r in images if r["sha256"] is None]
    assert len(absent) == {"imagereward": 1, "hpdv3": 1}.get(name, 0) == header["n_images_absent"]


def test_run_eval_lists_altered_and_missing_files_and_records_the_manifest_hash(built, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(built["data"] / "imagereward", data / "imagereward")
    shutil.copytree(built["data"] / "pickapic_v2", data / "pickapic_v2")
    altered, missing = "images/test/000001-0.png", "images/test/000002-1.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(data / "imagereward" / altered)
    (data / "imagereward" / missing).unlink()
    manifest = built["manifests"] / "imagereward-test.jsonl"
    records = lines(manifest)
    pairs = [r["pair"] for r in records if "pair" in r]
    absent = {r["image"] for r in records[1:] if "image" in r and r["sha256"] is None}
    left_out = {f"000001-0001/{altered}", f"000002-0002/{missing}"} | absent
    expected_scored = sum(1 for _, a, b, _ in pairs if a not in left_out and b not in left_out)
    assert 0 < expected_scored < len(pairs)

    output_dir = tmp_path / "out"
    argv = ["--scorer", "clip", "--model", built["clip"], "--benchmarks", "imagereward,pickapic",
            "--data_dir", str(data), "--manifests", str(built["manifests"]), "--output_dir", str(output_dir),
            "--cache_dir", str(tmp_path / "cache"), "--bootstrap_samples", "0"]  # fmt: skip
    assert run_eval.main(argv) == 0
    results = json.loads((output_dir / "results.json").read_text())["CLIP [tiny-clip]"]
    check = results["imagereward"]["manifest"]
    assert check["sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert (check["missing_files"], check["altered_files"]) == ([missing], [altered])
    assert check["n_pairs"] == len(pairs) and results["imagereward"]["n_pairs"] == expected_scored
    assert check["n_pairs_differing"] == 0
    # The untouched Pick-a-Pic copy matches its manifest (images embedded in parquet are checked by their bytes).
    pickapic = results["pickapic_v2"]["manifest"]
    assert pickapic["missing_files"] == [] and pickapic["altered_files"] == []
    table = (output_dir / "results.md").read_text()
    assert f"| {expected_scored} of {len(pairs)} |" in table
    assert "## Split manifests" in table and f"1: {missing}" in table and f"1: {altered}" in table


def test_errors_name_the_problem_and_the_fix(built, tmp_path):
    bench = load_benchmark("hpdv2", str(built["data"]))
    wrong = manifests.read_manifest(built["manifests"] / "hpdv3-test.jsonl")
    with pytest.raises(ValueError, match=r"is for hpdv3 \[test\], not hpdv2 \[test\]: use hpdv2-test.jsonl"):
        manifests.verify_benchmark(bench, wrong, "hpdv3-test.jsonl")
    with pytest.raises(FileNotFoundError, match=r"No manifest for hpdv2 \[test\][\s\S]*dinalrm.evaluation.manifests"):
        manifests.apply_manifests(bench, str(tmp_path))
    existing = built["manifests"] / "hpdv2-test.jsonl"
    with pytest.raises(FileExistsError, match="--overwrite"):
        manifests.write_manifest(existing, wrong)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "dinalrm-split-manifest/1"}\n{"pair": [1, 2]}\n')
    with pytest.raises(ValueError, match="line 2: not a split manifest line"):
        manifests.read_manifest(bad)
