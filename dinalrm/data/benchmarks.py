"""Evaluation datasets: public reward-model test sets -> scored image list + preference pairs.

Each adapter reads a benchmark from the Hub or from a local copy in `data_dir/<name>/` and returns a
[`Benchmark`]: the distinct images to score (id -> [`BenchmarkImage`], each with its prompt and
a lazy loader), the pairs `(group_id, image_a, image_b, label)` to compare, and what was dropped.
`label` is FIRST (+1, `image_a` preferred), SECOND (-1) or TIE (0). Per protocol:

* `imagereward` — ImageReward test (`id, prompt, generations, ranking`; 1 = best): every pair of a
  prompt with distinct ranks; GT ties dropped and counted; micro average (ImageReward's `acc`).
* `hpdv2` — HPDv2 test (`prompt, image_path, rank`; lower = better): all C(n, 2) pairs of a prompt;
  GT ties are kept as TIE pairs and always credited; macro average over prompts. This is HPSv2's
  `inversion_score`: per prompt `1 - discordant / C(n, 2)`, where a GT-tied pair is never discordant
  yet stays in the denominator.
* `hpdv3` — HPDv3 test (`prompt, path1, path2, ...`): one pair per row, `path1` preferred; micro.
* `genai_bench` — GenAI-Bench `image_generation` (`left_image, right_image, vote_type`): tievote and
  bothbad_vote rows dropped and counted (apart); micro.
* `pickapic_v2` — Pick-a-Pic v2 `test_unique` (default) or `test` (`caption, jpg_0, jpg_1,
  label_0, label_1`): 0.5/0.5 ties dropped and counted; micro.
* `canonical` — any dataset in the repository's canonical pair schema (`prompt, chosen, rejected[, weight]`,
  image columns; what `dinalrm.data.write_canonical_pairs` and the tiny world's `make_pairs.py`
  write), default split `test`: one pair per row, `chosen` preferred, `weight` ignored; micro. It has no
  default dataset: pass `hub_id` (a Hub id or a local folder) or put it in `data_dir/canonical/`.

Everywhere a score tie (equal scores on a pair with a strict human preference) counts as wrong.
HPSv2's own code ranks by `argsort` and so breaks exact score ties by position; we do not.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import datasets
from PIL import Image

from .images import MISSING, ImageLoadError, ImageSource, is_within, load_image
from .preference import FIRST, GT_TIE, INVALID_LABEL, SECOND, TIE, SkipStats, pickapic_preference


logger = logging.getLogger(__name__)

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkImage",
    "BenchmarkPair",
    "DatasetCell",
    "collect_scores",
    "PairMargins",
    "load_benchmark",
    "pair_margins",
]

BOTH_BAD = "both_bad"
MALFORMED = "malformed_record"  # a benchmark row with a missing or null field, or ranks that are not numbers


@dataclass(frozen=True)
class _Spec:
    hub_id: str | None
    split: str
    averaging: str


BENCHMARKS: dict[str, _Spec] = {
    "imagereward": _Spec("THUDM/ImageRewardDB", "test", "micro"),
    "hpdv2": _Spec("ymhao/HPDv2", "test", "macro"),
    "hpdv3": _Spec("MizzenAI/HPDv3", "test", "micro"),
    "genai_bench": _Spec("TIGER-Lab/GenAI-Bench", "test", "micro"),
    "pickapic_v2": _Spec("yuvalkirstain/pickapic_v2", "test_unique", "micro"),
    "canonical": _Spec(None, "test", "micro"),  # our own pair schema; the source is always given
}
GENAI_BENCH_CONFIG = "image_generation"
GENAI_VOTES = {"leftvote": FIRST, "rightvote": SECOND, "tievote": TIE}
# The published value is "bothbad_vote" (GenAI-Arena's vote name); "both-bad" is accepted as an alternate spelling.
GENAI_BOTH_BAD = {"bothbad_vote", "both-bad"}
# Image columns of the row-per-pair tables: image id suffix -> column, the first image being `image_a`.
GENAI_IMAGES = {"left": "left_image", "right": "right_image"}
PICKAPIC_IMAGES = {"0": "jpg_0", "1": "jpg_1"}
CANONICAL_IMAGES = {"chosen": "chosen", "rejected": "rejected"}


class BenchmarkPair(NamedTuple):
    """One comparison: `label` is FIRST if `image_a` is preferred, SECOND if `image_b`, TIE if tied."""

    group_id: str
    image_a: str
    image_b: str
    label: int


class DatasetCell(NamedTuple):
    """A lazy reference to an image stored in a `datasets.Dataset` (avoids holding all bytes in memory)."""

    dataset: datasets.Dataset
    row: int
    column: str


@dataclass(frozen=True)
class BenchmarkImage:
    """An image to score: its prompt and where to read it from (path, record, bytes or DatasetCell)."""

    prompt: str
    source: ImageSource | DatasetCell

    def load(self) -> Image.Image:
        """Decode to RGB; raises ImageLoadError for a missing or corrupt image."""
        source = self.source
        if isinstance(source, DatasetCell):
            source = source.dataset[source.row][source.column]
        return load_image(source)


@dataclass
class Benchmark:
    """A loaded benchmark: images to score, pairs to compare, and what was dropped (`stats`)."""

    name: str
    split: str
    averaging: str
    images: dict[str, BenchmarkImage]
    pairs: list[BenchmarkPair]
    stats: SkipStats = field(default_factory=SkipStats)
    manifest: dict[str, Any] | None = None  # how the copy compared with a split manifest, when one was checked

    @property
    def n_gt_ties_dropped(self) -> int:
        """Human ties removed by the protocol (GenAI-Bench's both-bad votes are counted apart)."""
        return self.stats[GT_TIE]

    @property
    def n_missing_images(self) -> int:
        """Distinct images listed by the benchmark but absent on disk or empty."""
        return self.stats[MISSING]


class _Builder:
    """Accumulates images, pairs and drop counts while an adapter walks its records."""

    def __init__(self) -> None:
        self.images: dict[str, BenchmarkImage] = {}
        self.pairs: list[BenchmarkPair] = []
        self.stats = SkipStats()
        self._missing: set[str] = set()

    def add_file(self, image_id: str, prompt: str, path: str | None) -> str:
        """Register an image file; a missing file is counted once and left out of `images`."""
        if image_id in self.images or image_id in self._missing:
            return image_id
        if path is None or not os.path.isfile(path):
            self._missing.add(image_id)
            self.stats.count(MISSING)
        else:
            self.images[image_id] = BenchmarkImage(prompt, path)
        return image_id

    def add_cell(
        self, image_id: str, prompt: str, dataset: datasets.Dataset, row: int, column: str, value: Any
    ) -> str:
        """Register an image embedded in a dataset row; an empty cell is counted as missing."""
        empty = not value.get("bytes") and not value.get("path") if isinstance(value, Mapping) else not value
        if empty:
            self._missing.add(image_id)
            self.stats.count(MISSING)
        else:
            self.images[image_id] = BenchmarkImage(prompt, DatasetCell(dataset, row, column))
        return image_id

    def add_pair(self, group_id: str, image_a: str, image_b: str, label: int) -> None:
        self.pairs.append(BenchmarkPair(group_id, image_a, image_b, label))

    def add_row_pair(
        self, group_id: str, prompt: str, table: datasets.Dataset, row: int, columns: Mapping[str, str], label: int
    ) -> None:
        """A pair from two image columns of `table[row]`: `columns` maps id suffix -> column, `image_a` first."""
        cells = table[row]
        image_a, image_b = (
            self.add_cell(f"{row}/{suffix}", prompt, table, row, column, cells[column])
            for suffix, column in columns.items()
        )
        self.add_pair(group_id, image_a, image_b, label)

    def add_ranked(self, group_id: str, image_ids: Sequence[str], ranks: Sequence[Any], credit_ties: bool) -> None:
        """All pairs of a ranked list (lower rank = better); GT ties credited (TIE pair) or dropped.

        Ranks are compared as numbers (`"10"` ranks after `"9"`); a group whose ranks are not numbers, or not one per
        image, is skipped and counted as a malformed record.
        """
        numbers = [_rank_number(rank) for rank in ranks]
        if len(image_ids) != len(ranks) or None in numbers:
            logger.warning(f"Group {group_id!r}: {len(image_ids)} images with ranks {list(ranks)!r}; skipped.")
            self.stats.count(MALFORMED)
            return
        ranks = numbers
        for i in range(len(image_ids)):
            for j in range(i + 1, len(image_ids)):
                if ranks[i] == ranks[j]:
                    if credit_ties:
                        self.add_pair(group_id, image_ids[i], image_ids[j], TIE)
                    else:
                        self.stats.count(GT_TIE)
                else:
                    self.add_pair(group_id, image_ids[i], image_ids[j], FIRST if ranks[i] < ranks[j] else SECOND)

    def build(self, name: str, split: str, averaging: str) -> Benchmark:
        self.stats.kept = len(self.pairs)
        self.stats.report(f"Benchmark {name} [{split}] pairs", logger)
        return Benchmark(name, split, averaging, self.images, self.pairs, self.stats)


class _FileResolver:
    """Maps the relative image paths a benchmark lists to files under an (extracted) root.

    A path is looked up as `root/path` first; archives whose internal folders differ from the
    listed paths are handled by falling back to a unique file-name match under `root`.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._by_name: dict[str, str | None] | None = None

    def __call__(self, relpath: str) -> str | None:
        if not is_within(relpath, self.root):
            return None  # a benchmark only names files under its root: counted as a missing image
        direct = os.path.join(self.root, relpath)
        if os.path.isfile(direct):
            return direct
        if self._by_name is None:
            self._by_name = {}
            for folder, _, files in os.walk(self.root):
                for name in files:
                    # A name seen twice is ambiguous: remember it as None rather than guess.
                    self._by_name[name] = None if name in self._by_name else os.path.join(folder, name)
        return self._by_name.get(os.path.basename(relpath))


def _rank_number(rank: Any) -> float | None:
    """A rank as a number (numeric strings included), or None for anything else (null, NaN, text, booleans)."""
    if isinstance(rank, bool):
        return None
    try:
        number = float(rank)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _fields(builder: _Builder, record: Any, keys: Sequence[str]) -> tuple[Any, ...] | None:
    """The values of `keys` in a JSON record, or None, counted as a malformed record, when the record is not an
    object, a key is missing or null, or its prompt is not a non-empty string: one bad row never aborts a run."""
    if not isinstance(record, Mapping) or any(record.get(key) is None for key in keys):
        builder.stats.count(MALFORMED)
        return None
    prompt = record.get("prompt")
    if "prompt" in keys and not (isinstance(prompt, str) and prompt.strip()):
        builder.stats.count(MALFORMED)
        return None
    return tuple(record[key] for key in keys)


def _group_key(prompt_groups: dict[str, str], prompt: str) -> str:
    """Stable group id per distinct prompt (row-per-pair benchmarks group by prompt)."""
    return prompt_groups.setdefault(prompt, f"p{len(prompt_groups)}")


def _read_json_list(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        try:
            records = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}): it may be truncated; download it again.") from err
    if not isinstance(records, list):
        raise ValueError(f"{path} should hold a JSON list of records, found {type(records).__name__}.")
    return records


def _extract(archive: str, target: str) -> str:
    """Extract a .zip/.tar(.gz) once into `target` (a marker file makes re-runs free)."""
    marker = os.path.join(target, f".extracted-{os.path.basename(archive)}")
    if not os.path.exists(marker):
        os.makedirs(target, exist_ok=True)
        logger.info("Extracting %s to %s", archive, target)
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as handle:
                handle.extractall(target)
        else:
            with tarfile.open(archive) as handle:
                handle.extractall(target, filter="data")
        open(marker, "w").close()
    return target


def _extraction_dir(name: str, split: str, cache_dir: str | None) -> str:
    base = cache_dir or datasets.config.HF_DATASETS_CACHE
    return os.path.join(os.fspath(base), "dinalrm_benchmarks", name, split)


def _imagereward(
    folder: str | None, spec: _Spec, split: str, cache_dir: str | None
) -> tuple[list[dict[str, Any]], _FileResolver]:
    """ImageReward records `{id, prompt, generations, ranking}` and the resolver for their paths."""
    if folder is not None:
        return _read_json_list(os.path.join(folder, f"{split}.json")), _FileResolver(folder)
    from huggingface_hub import snapshot_download

    snapshot = snapshot_download(
        spec.hub_id,
        repo_type="dataset",
        allow_patterns=[f"metadata-{split}.parquet", f"images/{split}/*.zip"],
        cache_dir=cache_dir,
    )
    target = _extraction_dir("imagereward", split, cache_dir)
    for archive in sorted(os.listdir(os.path.join(snapshot, "images", split))):
        _extract(os.path.join(snapshot, "images", split, archive), target)
    # ImageRewardDB lists one image per row; regroup rows by prompt_id into the test.json form.
    table = datasets.Dataset.from_parquet(os.path.join(snapshot, f"metadata-{split}.parquet"), cache_dir=cache_dir)
    records: dict[str, dict[str, Any]] = {}
    for row in table.select_columns(["image_path", "prompt_id", "prompt", "rank"]):
        record = records.setdefault(
            row["prompt_id"], {"id": row["prompt_id"], "prompt": row["prompt"], "generations": [], "ranking": []}
        )
        record["generations"].append(row["image_path"])
        record["ranking"].append(row["rank"])
    return list(records.values()), _FileResolver(target)


def _load_imagereward(folder: str | None, spec: _Spec, split: str, cache_dir: str | None, **_: Any) -> _Builder:
    records, resolve = _imagereward(folder, spec, split, cache_dir)
    builder = _Builder()
    for record in records:
        if (fields := _fields(builder, record, ("id", "prompt", "generations", "ranking"))) is None:
            continue
        record_id, prompt, generations, ranking = fields
        group = str(record_id)
        ids = [builder.add_file(f"{group}/{path}", prompt, resolve(path)) for path in generations]
        builder.add_ranked(group, ids, ranking, credit_ties=False)
    return builder


def _load_hpdv2(folder: str | None, spec: _Spec, split: str, cache_dir: str | None, **_: Any) -> _Builder:
    if folder is not None:
        records, resolve = _read_json_list(os.path.join(folder, f"{split}.json")), _FileResolver(folder)
    else:
        from huggingface_hub import hf_hub_download

        meta = hf_hub_download(spec.hub_id, f"{split}.json", repo_type="dataset", cache_dir=cache_dir)
        archive = hf_hub_download(spec.hub_id, f"{split}.tar.gz", repo_type="dataset", cache_dir=cache_dir)
        records = _read_json_list(meta)
        resolve = _FileResolver(_extract(archive, _extraction_dir("hpdv2", split, cache_dir)))
    builder = _Builder()
    for index, record in enumerate(records):
        if (fields := _fields(builder, record, ("prompt", "image_path", "rank"))) is None:
            continue
        prompt, image_paths, ranks = fields
        group = str(index)
        ids = [builder.add_file(f"{group}/{path}", prompt, resolve(path)) for path in image_paths]
        builder.add_ranked(group, ids, ranks, credit_ties=True)
    return builder


def _load_hpdv3(
    folder: str | None, spec: _Spec, split: str, cache_dir: str | None, image_root: str | None = None, **_: Any
) -> _Builder:
    if folder is not None:
        meta, root = os.path.join(folder, f"{split}.json"), image_root or folder
    else:
        if image_root is None:
            raise ValueError(
                f"HPDv3 images ship as split tarballs (images.tar.gz.*) in {spec.hub_id}: download and extract "
                "them, then pass image_root=<extracted folder>, or put test.json and the images in "
                "<data_dir>/hpdv3/."
            )
        from huggingface_hub import hf_hub_download

        meta, root = (
            hf_hub_download(spec.hub_id, f"{split}.json", repo_type="dataset", cache_dir=cache_dir),
            image_root,
        )
    resolve = _FileResolver(root)
    builder = _Builder()
    groups: dict[str, str] = {}
    for record in _read_json_list(meta):
        if (fields := _fields(builder, record, ("prompt", "path1", "path2"))) is None:
            continue
        prompt, path1, path2 = fields
        group = _group_key(groups, prompt)
        first = builder.add_file(f"{group}/{path1}", prompt, resolve(path1))
        second = builder.add_file(f"{group}/{path2}", prompt, resolve(path2))
        builder.add_pair(group, first, second, FIRST)
    return builder


def _load_table(
    folder: str | None,
    hub_id: str,
    config: str | None,
    split: str,
    cache_dir: str | None,
    image_columns: Iterable[str],
) -> datasets.Dataset:
    """A split through `datasets.load_dataset` (Hub id or local folder), image columns left encoded."""
    if folder is not None:
        table = datasets.load_dataset(folder, split=split, cache_dir=cache_dir)
    else:
        table = datasets.load_dataset(hub_id, config, split=split, cache_dir=cache_dir)
    for column in image_columns:
        feature = table.features.get(column)
        if feature is None:
            raise ValueError(f"{hub_id} [{split}] has no column {column!r}; found {table.column_names}.")
        if isinstance(feature, datasets.Image) and feature.decode:
            table = table.cast_column(column, datasets.Image(decode=False))
    return table


def _row_pairs(
    table: datasets.Dataset, prompts: Iterable[str], labels: Iterable[int | str | None], columns: Mapping[str, str]
) -> _Builder:
    """One pair per row of a row-per-pair table, grouped by prompt.

    `labels` holds per row FIRST or SECOND (kept), TIE (counted as a GT tie), None (an invalid label) or the
    name of another reason to drop the row (e.g. BOTH_BAD), counted under that name.
    """
    builder = _Builder()
    groups: dict[str, str] = {}
    for row, (prompt, label) in enumerate(zip(prompts, labels, strict=True)):
        if not (isinstance(prompt, str) and prompt.strip()):
            builder.stats.count(MALFORMED)
        elif label == FIRST or label == SECOND:
            builder.add_row_pair(_group_key(groups, prompt), prompt, table, row, columns, label)
        else:
            builder.stats.count(GT_TIE if label == TIE else INVALID_LABEL if label is None else label)
    return builder


def _genai_label(vote: str) -> int | str | None:
    return BOTH_BAD if vote in GENAI_BOTH_BAD else GENAI_VOTES.get(vote)


def _load_genai_bench(folder: str | None, spec: _Spec, split: str, cache_dir: str | None, **_: Any) -> _Builder:
    table = _load_table(folder, spec.hub_id, GENAI_BENCH_CONFIG, split, cache_dir, GENAI_IMAGES.values())
    return _row_pairs(table, table["prompt"], map(_genai_label, table["vote_type"]), GENAI_IMAGES)


def _load_pickapic(folder: str | None, spec: _Spec, split: str, cache_dir: str | None, **_: Any) -> _Builder:
    table = _load_table(folder, spec.hub_id, None, split, cache_dir, PICKAPIC_IMAGES.values())
    labels = map(pickapic_preference, table["label_0"], table["label_1"])
    return _row_pairs(table, table["caption"], labels, PICKAPIC_IMAGES)


def _load_canonical(folder: str | None, spec: _Spec, split: str, cache_dir: str | None, **_: Any) -> _Builder:
    if folder is None and spec.hub_id is None:
        raise ValueError(
            "The canonical benchmark has no default dataset: pass hub_id (a Hub dataset id or a local folder; "
            "eval scripts: --pairs PATH_OR_ID) or put it in <data_dir>/canonical/."
        )
    table = _load_table(folder, spec.hub_id or folder, None, split, cache_dir, CANONICAL_IMAGES.values())
    return _row_pairs(table, table["prompt"], [FIRST] * len(table), CANONICAL_IMAGES)


_ADAPTERS: dict[str, Callable[..., _Builder]] = {
    "imagereward": _load_imagereward,
    "hpdv2": _load_hpdv2,
    "hpdv3": _load_hpdv3,
    "genai_bench": _load_genai_bench,
    "pickapic_v2": _load_pickapic,
    "canonical": _load_canonical,
}


def load_benchmark(
    name: str,
    data_dir: str | None = None,
    *,
    split: str | None = None,
    hub_id: str | None = None,
    image_root: str | None = None,
    cache_dir: str | None = None,
) -> Benchmark:
    """Load benchmark `name` (a key of BENCHMARKS) from `data_dir/<name>/` or, without data_dir, the Hub.

    Local layouts: `imagereward`, `hpdv2`, `hpdv3` — `<split>.json` in the published format with
    image paths relative to that folder; `genai_bench`, `pickapic_v2`, `canonical` — a folder that
    `datasets.load_dataset` reads (e.g. parquet files with the published columns, one split per file
    name). `hub_id` overrides the default repository (e.g. a Pick-a-Pic mirror; for `canonical`, which has
    none, a Hub id or a local folder); `image_root` points at extracted HPDv3 images when its JSON comes from
    the Hub.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}.")
    spec = BENCHMARKS[name]
    if hub_id is not None:
        spec = _Spec(hub_id, spec.split, spec.averaging)
    split = split or spec.split
    folder = None
    if data_dir is not None:
        folder = os.path.join(data_dir, name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"No local copy of {name}: expected a folder at {folder}.")
    builder = _ADAPTERS[name](folder, spec, split, cache_dir, image_root=image_root)
    return builder.build(name, split, spec.averaging)


def collect_scores(
    benchmark: Benchmark,
    score_fn: Callable[[list[str], list[Image.Image]], Sequence[float]],
    batch_size: int = 16,
) -> tuple[dict[str, float], SkipStats]:
    """Score every image of `benchmark` with `score_fn(prompts, images) -> scores`, batch by batch.

    Images that fail to load are skipped and counted per reason (their pairs are then excluded, and
    counted, by `pair_margins`). Returns `(scores_by_image, stats)`.
    """
    scores: dict[str, float] = {}
    stats = SkipStats()
    batch: list[tuple[str, str, Image.Image]] = []

    def flush() -> None:
        ids, prompts, images = zip(*batch, strict=True)
        values = list(score_fn(list(prompts), list(images)))
        if len(values) != len(ids):
            raise ValueError(f"score_fn returned {len(values)} scores for {len(ids)} images.")
        scores.update((image_id, float(value)) for image_id, value in zip(ids, values, strict=True))
        batch.clear()

    for image_id, item in benchmark.images.items():
        try:
            batch.append((image_id, item.prompt, item.load()))
        except ImageLoadError as err:
            logger.debug("Skipping image %s: %s", image_id, err)
            stats.count(err.reason)
            continue
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    stats.kept = len(scores)
    stats.report(f"Benchmark {benchmark.name} [{benchmark.split}] images scored", logger)
    return scores, stats


class PairMargins(NamedTuple):
    """Scored pairs in the form the pairwise-accuracy metric (`eval/pairwise_accuracy`) takes them."""

    margins: list[float]  # per scored pair: score(preferred) - score(other); score(a) - score(b) for a TIE pair
    group_ids: list[str]
    gt_tie: list[bool]  # TIE pairs (HPDv2's human ties, credited as correct by the metric)
    n_missing_images: int  # distinct images of the pairs that have no score
    n_pairs_missing_image: int  # pairs left out because one of their images has no score


def pair_margins(
    pairs: Iterable[BenchmarkPair | tuple[str, str, str, int]], scores_by_image: Mapping[str, float]
) -> PairMargins:
    """The margin by which each pair's preferred image outscores the other (higher score = better).

    The metric counts a positive margin as correct and zero (a score tie) as wrong; TIE pairs are flagged in
    `gt_tie`. Pairs with an unscored image are left out and counted. Non-finite scores raise ValueError.
    """
    margins: list[float] = []
    group_ids: list[str] = []
    gt_tie: list[bool] = []
    missing: set[str] = set()
    n_pairs_missing = 0
    for group_id, image_a, image_b, label in pairs:
        if image_a not in scores_by_image or image_b not in scores_by_image:
            missing.update(i for i in (image_a, image_b) if i not in scores_by_image)
            n_pairs_missing += 1
            continue
        score_a, score_b = float(scores_by_image[image_a]), float(scores_by_image[image_b])
        if not (math.isfinite(score_a) and math.isfinite(score_b)):
            raise ValueError(f"Non-finite score for {image_a!r} or {image_b!r}: {score_a}, {score_b}.")
        if label not in (FIRST, SECOND, TIE):
            raise ValueError(f"Pair label must be FIRST (1), SECOND (-1) or TIE (0), got {label!r}.")
        margins.append((score_a - score_b) * (label or 1))
        group_ids.append(group_id)
        gt_tie.append(label == TIE)
    return PairMargins(margins, group_ids, gt_tie, len(missing), n_pairs_missing)
