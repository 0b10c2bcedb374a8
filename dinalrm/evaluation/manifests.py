"""Split manifests: the exact pairs a benchmark's protocol scores, with a checksum of every image, so that two
evaluations can tell whether they measured the same thing.

A manifest is a JSON-lines file. Line 1 is the header: `format`, `benchmark`, `dataset_id`, `revision` (the
dataset's Hub commit when it was built), `config`, `split`, `protocol` (averaging and what happens to human
ties), counts. Then one line per image, `{"image": id, "file": name, "sha256": hex}` (`sha256` of the file's
bytes, or of the encoded image bytes for datasets that embed images in parquet; `null` for an image the dataset
lists but did not ship), then one line per pair, `{"pair": [group_id, image_a, image_b, label]}` as
`dinalrm.data.benchmarks.BenchmarkPair`. Its own sha256 (of the file bytes) identifies it in `results.json`.

Build the manifests from the public datasets (needs Hub access):

    python -m dinalrm.evaluation.manifests --output_dir manifests

and evaluate against them with `run_eval.py --manifests manifests`: the local copy is checked image by image,
missing and altered files are listed by name and counted (and left unscored), and exactly the manifest's pairs
are scored.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dinalrm.data.benchmarks import (
    BENCHMARKS,
    GENAI_BENCH_CONFIG,
    Benchmark,
    BenchmarkPair,
    DatasetCell,
    load_benchmark,
)


logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "dinalrm-split-manifest/1"
# The manifests of the runner's benchmarks, as (benchmark, split): Pick-a-Pic v2 in both of its test splits.
DEFAULT_SPLITS = (
    ("imagereward", "test"), ("hpdv2", "test"), ("hpdv3", "test"), ("genai_bench", "test"),
    ("pickapic_v2", "test_unique"), ("pickapic_v2", "test"),
)  # fmt: skip
# How each protocol treats human ties (see dinalrm/data/benchmarks.py).
GT_TIES = {"hpdv2": "credited"}
CONFIGS = {"genai_bench": GENAI_BENCH_CONFIG}
CHUNK = 1 << 20


def manifest_filename(benchmark: str, split: str) -> str:
    """`<benchmark>-<split>.jsonl`, the name `run_eval.py --manifests DIR` looks for."""
    return f"{benchmark}-{split}.jsonl"


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def image_record(image_id: str, source: Any) -> dict[str, Any]:
    """`{"image", "file", "sha256"}` of a benchmark image (a file path, or a cell of a parquet table).

    File images are named by the path the benchmark lists (the part of the id after the group); embedded images
    by their cell's stored path, else `<column>[<row>]`.
    """
    if isinstance(source, DatasetCell):
        value = source.dataset[source.row][source.column]
        # An image feature (`{"bytes", "path"}`) or a binary column of encoded bytes (Pick-a-Pic's JPEGs).
        cell = value if isinstance(value, dict) else {"bytes": value}
        name = cell.get("path") or f"{source.column}[{source.row}]"
        data = cell.get("bytes")
        sha = hashlib.sha256(data).hexdigest() if data else file_sha256(cell["path"])
        return {"image": image_id, "file": name, "sha256": sha}
    return {"image": image_id, "file": image_id.split("/", 1)[-1], "sha256": file_sha256(source)}


@dataclass
class Manifest:
    """A parsed manifest: its header, images (id -> record), pairs, and the sha256 of the file it was read from."""

    header: dict[str, Any]
    images: dict[str, dict[str, Any]]
    pairs: list[BenchmarkPair]
    sha256: str | None = None

    def lines(self) -> Iterable[str]:
        yield json.dumps(self.header, sort_keys=True)
        for record in self.images.values():
            yield json.dumps(record, sort_keys=True)
        for pair in self.pairs:
            yield json.dumps({"pair": list(pair)})


def build_manifest(
    benchmark: Benchmark, dataset_id: str | None, revision: str | None, config: str | None = None
) -> Manifest:
    """The manifest of a loaded benchmark: every image its pairs use (with its checksum) and every pair."""
    used = list(dict.fromkeys(image for pair in benchmark.pairs for image in pair[1:3]))
    images = {}
    for image_id in used:
        item = benchmark.images.get(image_id)
        if item is None:
            images[image_id] = {"image": image_id, "file": image_id.split("/", 1)[-1], "sha256": None}
        else:
            images[image_id] = image_record(image_id, item.source)
    n_absent = sum(record["sha256"] is None for record in images.values())
    if n_absent:
        logger.warning("%s [%s]: %d listed images are absent from the source; recorded with sha256 null.",
                       benchmark.name, benchmark.split, n_absent)  # fmt: skip
    header = {
        "format": MANIFEST_FORMAT,
        "benchmark": benchmark.name,
        "dataset_id": dataset_id,
        "revision": revision,
        "config": config,
        "split": benchmark.split,
        "protocol": {"averaging": benchmark.averaging, "gt_ties": GT_TIES.get(benchmark.name, "dropped")},
        "n_pairs": len(benchmark.pairs),
        "n_images": len(images),
        "n_images_absent": n_absent,
        "n_gt_ties_dropped": benchmark.n_gt_ties_dropped,
    }
    return Manifest(header, images, list(benchmark.pairs))


def write_manifest(path: str | os.PathLike[str], manifest: Manifest, overwrite: bool = False) -> str:
    """Write `manifest` to `path` (refusing to replace a file unless `overwrite`); returns its sha256."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(manifest.lines()) + "\n")
    return file_sha256(path)


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Parse a manifest file; a wrong format or a malformed line raises ValueError naming the line."""
    images: dict[str, dict[str, Any]] = {}
    pairs: list[BenchmarkPair] = []
    header = None
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                record = json.loads(line)
                if number == 1:
                    header = record
                    if record.get("format") != MANIFEST_FORMAT:
                        raise ValueError(f"format {record.get('format')!r}, expected {MANIFEST_FORMAT!r}")
                elif "image" in record:
                    images[record["image"]] = record
                else:
                    group, image_a, image_b, label = record["pair"]
                    pairs.append(BenchmarkPair(str(group), image_a, image_b, int(label)))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}, line {number}: not a split manifest line ({err}).") from err
    if header is None:
        raise ValueError(f"{path} is empty: not a split manifest.")
    return Manifest(header, images, pairs, file_sha256(path))


@dataclass
class ManifestCheck:
    """How a local copy compares with a manifest (stored in `results.json` under each entry's `manifest`)."""

    path: str
    sha256: str
    n_pairs: int
    n_images: int
    missing_files: list[str] = field(default_factory=list)
    altered_files: list[str] = field(default_factory=list)
    n_pairs_differing: int = 0  # pairs (with their labels) in the manifest but not in the copy, or the other way

    def summary(self) -> str:
        def listed(names: list[str]) -> str:
            return ": " + ", ".join(names[:20]) + (f" (+{len(names) - 20} more)" if len(names) > 20 else "")

        lines = [f"manifest {os.path.basename(self.path)} (sha256 {self.sha256[:12]}): {self.n_pairs} pairs, "
                 f"{self.n_images} images"]  # fmt: skip
        if self.missing_files:
            lines.append(f"  {len(self.missing_files)} missing files{listed(self.missing_files)}")
        if self.altered_files:
            lines.append(f"  {len(self.altered_files)} altered files (checksum differs, not scored)"
                         f"{listed(self.altered_files)}")  # fmt: skip
        if self.n_pairs_differing:
            lines.append(f"  {self.n_pairs_differing} pairs differ between the copy and the manifest "
                         "(the manifest's are scored)")  # fmt: skip
        return "\n".join(lines)


def verify_benchmark(benchmark: Benchmark, manifest: Manifest, path: str = "") -> tuple[Benchmark, ManifestCheck]:
    """The benchmark restricted to the manifest: its pairs, and only the images whose checksum matches.

    Missing and altered images (by file name) are left out, so the pairs using them count as pairs with a missing
    image in the accuracy entry (`n_pairs` then says how many of the manifest's pairs were scored).
    """
    header = manifest.header
    if (header.get("benchmark"), header.get("split")) != (benchmark.name, benchmark.split):
        raise ValueError(
            f"{path or 'The manifest'} is for {header.get('benchmark')} [{header.get('split')}], not "
            f"{benchmark.name} [{benchmark.split}]: use {manifest_filename(benchmark.name, benchmark.split)}."
        )
    check = ManifestCheck(path, manifest.sha256 or "", len(manifest.pairs), len(manifest.images))
    images = {}
    for image_id, record in manifest.images.items():
        item = benchmark.images.get(image_id)
        if record.get("sha256") is None:
            continue  # listed by the dataset but never shipped: unscored everywhere alike
        if item is None:
            check.missing_files.append(record["file"])
        elif image_record(image_id, item.source)["sha256"] != record["sha256"]:
            check.altered_files.append(record["file"])
        else:
            images[image_id] = item
    check.n_pairs_differing = len(set(manifest.pairs).symmetric_difference(benchmark.pairs))
    return replace(benchmark, images=images, pairs=list(manifest.pairs)), check


def apply_manifests(benchmark: Benchmark, manifest_dir: str) -> tuple[Benchmark, ManifestCheck]:
    """`verify_benchmark` against `manifest_dir/<benchmark>-<split>.jsonl`, logging the check's summary."""
    path = os.path.join(manifest_dir, manifest_filename(benchmark.name, benchmark.split))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No manifest for {benchmark.name} [{benchmark.split}] at {path}: build it with "
            f"`python -m dinalrm.evaluation.manifests --benchmarks {benchmark.name}:{benchmark.split} "
            f"--output_dir {manifest_dir}` (see manifests/README.md)."
        )
    verified, check = verify_benchmark(benchmark, read_manifest(path), path)
    logger.info("%s [%s] against %s", benchmark.name, benchmark.split, check.summary())
    return verified, check


def check_entry(check: ManifestCheck) -> dict[str, Any]:
    """The `manifest` field of a results.json entry."""
    entry = asdict(check)
    entry["path"] = os.path.basename(check.path)
    return entry


def hub_revision(dataset_id: str) -> str:
    """The current commit of a Hub dataset (what the manifest was built from)."""
    from huggingface_hub import HfApi

    return HfApi().dataset_info(dataset_id).sha


def parse_split_list(text: str) -> list[tuple[str, str]]:
    """`"imagereward,pickapic_v2:test"` -> `[("imagereward", "test"), ("pickapic_v2", "test")]`."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, split = item.partition(":")
        if name not in BENCHMARKS or name == "canonical":
            raise argparse.ArgumentTypeError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}.")
        pairs.append((name, split or BENCHMARKS[name].split))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build split manifests from the public benchmark datasets.")
    parser.add_argument(
        "--benchmarks", type=parse_split_list, default=list(DEFAULT_SPLITS),
        help="Comma-separated BENCHMARK[:SPLIT] (default: all of the runner's, Pick-a-Pic v2 in test_unique and test).",
    )  # fmt: skip
    parser.add_argument("--output_dir", default="manifests")
    parser.add_argument(
        "--data_dir", default=None, help="Build from a local copy instead of the Hub (needs --revision)."
    )
    parser.add_argument("--revision", default=None, help="The dataset revision a --data_dir copy is of.")
    parser.add_argument(
        "--hpdv3_image_root", default=None, help="Extracted HPDv3 images (they ship as split tarballs)."
    )
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--overwrite", action="store_true", help="Replace existing manifest files.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.data_dir is not None and args.revision is None:
        parser.error("--data_dir needs --revision (the dataset commit the copy is of), which the manifest records.")
    for name, split in args.benchmarks:
        dataset_id = BENCHMARKS[name].hub_id
        image_root = args.hpdv3_image_root if name == "hpdv3" else None
        benchmark = load_benchmark(name, args.data_dir, split=split, image_root=image_root, cache_dir=args.cache_dir)
        revision = args.revision or hub_revision(dataset_id)
        manifest = build_manifest(benchmark, dataset_id, revision, CONFIGS.get(name))
        path = os.path.join(args.output_dir, manifest_filename(name, split))
        sha = write_manifest(path, manifest, args.overwrite)
        print(f"{path}: {len(manifest.pairs)} pairs, {len(manifest.images)} images, sha256 {sha}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
