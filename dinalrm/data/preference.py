"""Training preference pairs: public schemas -> one canonical ``datasets.Dataset``.

Canonical pair (the one format the trainer reads, whatever the source schema): ``prompt: str``, ``chosen`` /
``rejected`` images, ``weight: float32``, plus the aspect-ratio bucket ``bucket_width`` / ``bucket_height`` both
images are resized to (see :mod:`dinalrm.training.buckets`). Images are stored as ``datasets.Image(decode=False)`` records
``{"bytes": ..., "path": ...}``: a path for files on disk (HPDv3, canonical path columns), the encoded bytes for
embedded images (Pick-a-Pic, canonical ``Image`` columns). Decode them with :func:`dinalrm.data.images.load_image`,
which also fixes the colour mode; keeping records instead of PIL images keeps the table small and defers decoding
to the data loader workers.

Rows that cannot be used are dropped and counted per reason in a :class:`SkipStats` (logged as one
warning with the totals): missing or corrupt images, ties, invalid labels, low-confidence HPDv3
pairs, empty prompts, pairs whose two images fall in different aspect-ratio buckets.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets
from PIL import Image

from dinalrm.training import BucketSet

from .images import MISSING, OUTSIDE_ROOT, ImageLoadError, is_within, load_image, read_image_size


logger = logging.getLogger(__name__)

__all__ = [
    "ColumnNames",
    "DATA_FORMATS",
    "FIRST",
    "SECOND",
    "TIE",
    "SkipStats",
    "detect_format",
    "image_record",
    "load_preference_dataset",
    "load_table_file",
    "pickapic_preference",
    "resize_and_center_crop",
]

# Preference labels shared with the benchmark adapters: which member of an ordered pair humans prefer.
FIRST = 1
SECOND = -1
TIE = 0

# Skip reasons (image reasons come from dinalrm.data.images: missing_image, corrupt_image, oversized_image).
GT_TIE = "gt_tie"
INVALID_LABEL = "invalid_label"
INVALID_WEIGHT = "invalid_weight"
LOW_CONFIDENCE = "low_confidence"
NULL_CONFIDENCE = "null_confidence"
EMPTY_PROMPT = "empty_prompt"
BUCKET_MISMATCH = "bucket_mismatch"

HPDV3_COLUMNS = ("prompt", "path1", "path2")
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
DATA_FORMATS = ("canonical", "hpdv3", "pickapic")
HPDV3_HUB_ID = "MizzenAI/HPDv3"

_ROW_IMAGE = datasets.Image(decode=False)
CANONICAL_FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),
        "chosen": _ROW_IMAGE,
        "rejected": _ROW_IMAGE,
        "weight": datasets.Value("float32"),
        "bucket_width": datasets.Value("int32"),
        "bucket_height": datasets.Value("int32"),
    }
)
_SKIP_COLUMN = "skip_reason"
# With keep_ties=True (Pick-a-Pic ties, for losses that train on ties such as LRM's) the table gains this column;
# a tie keeps the source's image order.
TIE_COLUMN = "tie"
_CHECKED_FEATURES = datasets.Features(
    {**CANONICAL_FEATURES, TIE_COLUMN: datasets.Value("bool"), _SKIP_COLUMN: datasets.Value("string")}
)


@dataclass
class SkipStats:
    """How many items were kept and how many were dropped, per reason (never drop silently)."""

    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def count(self, reason: str, n: int = 1) -> None:
        """Record ``n`` items dropped for ``reason``."""
        self.skipped[reason] += n

    def __getitem__(self, reason: str) -> int:
        return self.skipped.get(reason, 0)

    @property
    def n_skipped(self) -> int:
        """Total number of dropped items."""
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, int]:
        """Plain dict for logs and JSON reports: ``kept``, ``skipped`` and one entry per reason."""
        return {"kept": self.kept, "skipped": self.n_skipped, **dict(sorted(self.skipped.items()))}

    def report(self, what: str, log: logging.Logger = logger) -> None:
        """Log the totals to ``log``: a warning when anything was dropped, else an info line."""
        if self.n_skipped:
            reasons = ", ".join(f"{reason}={n}" for reason, n in sorted(self.skipped.items()))
            log.warning("%s: kept %d, skipped %d (%s)", what, self.kept, self.n_skipped, reasons)
        else:
            log.info("%s: kept %d, skipped none", what, self.kept)


@dataclass(frozen=True)
class ColumnNames:
    """Column names of the canonical format (configurable for custom datasets)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    weight: str = "weight"


def pickapic_preference(label_0: float | None, label_1: float | None) -> int | None:
    """Map Pick-a-Pic's ``label_0, label_1`` to FIRST (1/0), SECOND (0/1), TIE (0.5/0.5) or None (invalid)."""
    if label_0 is None or label_1 is None:
        return None
    if label_0 == 1 and label_1 == 0:
        return FIRST
    if label_0 == 0 and label_1 == 1:
        return SECOND
    if label_0 == 0.5 and label_1 == 0.5:
        return TIE
    return None


def detect_format(column_names: Iterable[str], columns: ColumnNames | None = None) -> str:
    """Name the schema of a table from its columns: canonical, then hpdv3, then pickapic.

    Raises ValueError naming the columns found and what each accepted format needs.
    """
    columns = columns or ColumnNames()
    found = set(column_names)
    required = _required_columns(columns)
    for name in DATA_FORMATS:
        if set(required[name]) <= found:
            return name
    accepted = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in required.items())
    raise ValueError(
        f"Cannot tell the preference-data format from the columns {sorted(found)}. Accepted formats "
        f"and their required columns: {accepted}. Rename your columns, or pass the canonical names "
        "with `columns=ColumnNames(prompt=..., chosen=..., rejected=...)`."
    )


def _required_columns(columns: ColumnNames) -> dict[str, tuple[str, ...]]:
    return {
        "canonical": (columns.prompt, columns.chosen, columns.rejected),
        "hpdv3": HPDV3_COLUMNS,
        "pickapic": PICKAPIC_COLUMNS,
    }


def image_record(
    value: Any, root: str | os.PathLike[str] | None = None, absolute_anywhere: bool = False
) -> dict[str, Any]:
    """Normalise a table cell (path, encoded bytes or ``{"bytes", "path"}``) to an image record.

    Relative paths are made absolute against ``root`` so the record loads without further context.
    Raises ImageLoadError(MISSING) for an empty cell, ImageLoadError(OUTSIDE_ROOT) for a path that leaves ``root``
    (``../..`` or an absolute path elsewhere: a dataset only names files of its own; ``absolute_anywhere`` accepts
    absolute paths, for tables the user wrote, such as ``dinalrm-score --pairs``) and TypeError for an unsupported
    value.
    """
    if value is None:
        raise ImageLoadError(MISSING, "empty image cell")
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return {"bytes": bytes(data), "path": path}
        if not path:
            raise ImageLoadError(MISSING, "image record has neither bytes nor path")
        value = path
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if root is not None and not (absolute_anywhere and os.path.isabs(path)):
            if not is_within(path, root):
                raise ImageLoadError(OUTSIDE_ROOT, f"image path {path!r} leaves the dataset root {os.fspath(root)}")
            path = os.path.join(os.fspath(root), path)
        return {"bytes": None, "path": os.path.abspath(path)}
    raise TypeError(f"Unsupported image cell {type(value).__name__}: expected a path, bytes or an image record.")


def resize_and_center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` brought to its bucket ``size = (width, height)`` by the pipeline's one fixed-size rule.

    Lanczos, aspect kept, scaled up or down to cover ``size``, centre crop: see
    :func:`pipeline_dinalrm.resize_and_center_crop`, which ``DiNaLRMPipeline`` also applies for
    ``resolution=(height, width)``, so a model is trained and scored on the same pixels.

    Upscaling policy: images are upscaled when smaller than their bucket, never dropped for it. The upscale is
    bounded by the buckets: :class:`BucketSet` picks, among the sizes of the image's aspect-ratio class (the 1024²,
    512² and 256² classes scaled to ``--resolution``), the one closest in log-area, so an image whose area lies in
    that range is scaled by at most about √2 per side, plus the aspect-ratio difference to its bucket that the crop
    removes. A pair's bucket follows the geometric mean of its two areas, so the smaller image of an unequal pair is
    upscaled by a further square root of the pair's side ratio. An image smaller than the smallest bucket (a quarter
    of ``--resolution`` per side) is upscaled to it however small it is: filter such images out of the data if
    their blur matters.
    """
    # The Hub file (imported by dinalrm.data.images already, so this costs nothing).
    from pipeline_dinalrm import resize_and_center_crop as one_rule

    return one_rule(image, size)


@dataclass(frozen=True)
class _PairChecker:
    """Batched ``datasets.map`` function: one raw row -> one canonical row, or a row with a skip reason.

    Skips are written into a column rather than counted in Python state, so the counts survive
    ``datasets``' map cache and multiprocessing.
    """

    data_format: str
    columns: ColumnNames
    image_root: str | None
    min_confidence: float | None
    keep_null_confidence: bool
    buckets: BucketSet
    decode_check: bool
    keep_ties: bool = False

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {name: [] for name in _CHECKED_FEATURES}
        n_rows = len(next(iter(batch.values())))
        for i in range(n_rows):
            row = {name: values[i] for name, values in batch.items()}
            try:
                prompt, first, second, preference, weight = self._extract(row)
                chosen, rejected = (second, first) if preference == SECOND else (first, second)
                bucket = self._bucket(chosen, rejected)
                reason = ""
            except (_Skip, ImageLoadError) as err:
                prompt, chosen, rejected, weight, bucket, reason = "", None, None, 0.0, (0, 0), err.reason
                preference = FIRST
            out["prompt"].append(prompt)
            out["chosen"].append(chosen)
            out["rejected"].append(rejected)
            out["weight"].append(weight)
            out[TIE_COLUMN].append(reason == "" and preference == TIE)
            out["bucket_width"].append(bucket[0])
            out["bucket_height"].append(bucket[1])
            out[_SKIP_COLUMN].append(reason)
        return out

    def _extract(self, row: dict[str, Any]) -> tuple[str, dict, dict, int, float]:
        if self.data_format == "hpdv3":
            self._check_confidence(row.get("confidence"))
            prompt, first, second, preference, weight = row["prompt"], row["path1"], row["path2"], FIRST, 1.0
        elif self.data_format == "pickapic":
            preference = pickapic_preference(row["label_0"], row["label_1"])
            if preference is None:
                raise _Skip(INVALID_LABEL)
            if preference == TIE and not self.keep_ties:
                raise _Skip(GT_TIE)
            prompt, first, second, weight = row["caption"], row["jpg_0"], row["jpg_1"], 1.0
        else:
            c = self.columns
            prompt, first, second, preference = row[c.prompt], row[c.chosen], row[c.rejected], FIRST
            weight = row.get(c.weight)
            # A null weight in a table with a weight column is not a default 1.0: `datasets` reads NaN and Infinity of
            # JSON-array files as null (through pandas), so such a row cannot be told from a damaged one.
            if weight is None and c.weight in row:
                raise _Skip(INVALID_WEIGHT)
            weight = 1.0 if weight is None else float(weight)
            if not math.isfinite(weight) or weight < 0:
                raise _Skip(INVALID_WEIGHT)
        if not isinstance(prompt, str) or not prompt.strip():
            raise _Skip(EMPTY_PROMPT)
        return prompt, image_record(first, self.image_root), image_record(second, self.image_root), preference, weight

    def _check_confidence(self, confidence: float | None) -> None:
        if self.min_confidence is None:
            return
        if confidence is None:
            if not self.keep_null_confidence:
                raise _Skip(NULL_CONFIDENCE)
        elif confidence < self.min_confidence:
            raise _Skip(LOW_CONFIDENCE)

    def _size(self, record: dict[str, Any]) -> tuple[int, int]:
        return load_image(record).size if self.decode_check else read_image_size(record)

    def _bucket(self, chosen: dict[str, Any], rejected: dict[str, Any]) -> tuple[int, int]:
        bucket = self.buckets.assign_pair(self._size(chosen), self._size(rejected))
        if bucket is None:
            raise _Skip(BUCKET_MISMATCH)
        return bucket


class _Skip(Exception):
    """Internal signal: drop the current row for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _require_image_root(image_root: str | None) -> None:
    if image_root is None:
        raise ValueError(
            "HPDv3 stores image paths relative to its root: download and extract images.tar.gz.* from "
            f"{HPDV3_HUB_ID} and pass image_root=<extracted folder> (or use train_data_dir)."
        )


def _load_json_table(json_file: str, split: str, cache_dir: str | None) -> datasets.Dataset:
    """The records of a JSON file as a table; an empty, truncated or malformed file is refused by name."""
    problem = None
    if os.path.getsize(json_file) == 0:
        problem = "is empty"
    else:
        try:
            return datasets.load_dataset("json", data_files={split: json_file}, split=split, cache_dir=cache_dir)
        except (datasets.exceptions.DatasetGenerationError, StopIteration, ValueError) as err:
            problem = f"cannot be read as JSON records ({err.__cause__ or err})"
    raise ValueError(f"{json_file} {problem}: it may be truncated; download or write it again.")


TABLE_SUFFIXES = {".csv": "csv", ".json": "json", ".jsonl": "json"}


def load_table_file(path: str | os.PathLike[str], cache_dir: str | None = None) -> datasets.Dataset:
    """The records of one CSV or JSON / JSON Lines file (by its suffix) as a table, through ``datasets``."""
    path = os.fspath(path)
    kind = TABLE_SUFFIXES.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise ValueError(f"{path}: cannot tell the table format from its suffix; use .csv, .json or .jsonl.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is not a file.")
    if kind == "json":
        return _load_json_table(path, "train", cache_dir)
    return datasets.load_dataset("csv", data_files={"train": path}, split="train", cache_dir=cache_dir)


def _load_raw(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_data_dir: str | None,
    data_format: str,
    split: str,
    cache_dir: str | None,
) -> datasets.Dataset:
    """Load the raw table through ``datasets.load_dataset`` (Hub id or local folder)."""
    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError("Pass exactly one of dataset_name (a Hub id) or train_data_dir (a local folder).")
    if train_data_dir is not None:
        json_file = os.path.join(train_data_dir, f"{split}.json")
        if os.path.isfile(json_file):  # HPDv3's published layout: <root>/train.json + image folders
            return _load_json_table(json_file, split, cache_dir)
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(f"train_data_dir {train_data_dir!r} is not a folder.")
        return datasets.load_dataset(train_data_dir, split=split, cache_dir=cache_dir)
    if data_format == "hpdv3" or dataset_name == HPDV3_HUB_ID:
        # The HPDv3 repo holds JSON lists plus split image tarballs; read the split's JSON explicitly.
        data_files = {split: f"{split}.json"}
        return datasets.load_dataset(dataset_name, data_files=data_files, split=split, cache_dir=cache_dir)
    return datasets.load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)


def load_preference_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    data_format: str = "auto",
    columns: ColumnNames | Mapping[str, str] | None = None,
    max_samples: int | None = None,
    split: str = "train",
    cache_dir: str | None = None,
    *,
    image_root: str | None = None,
    min_confidence: float | None = None,
    keep_null_confidence: bool = True,
    buckets: BucketSet | None = None,
    decode_check: bool = True,
    num_proc: int | None = None,
    keep_rows: list[int] | None = None,
    keep_ties: bool = False,
) -> tuple[datasets.Dataset, SkipStats]:
    """Load preference pairs from a Hub id or local folder and return ``(canonical dataset, stats)``.

    Args:
        dataset_name / dataset_config_name: Hub dataset id and config (e.g. ``MizzenAI/HPDv3``).
        train_data_dir: local folder instead of a Hub id: HPDv3's layout (``<split>.json`` with image
            paths relative to the folder) or any folder ``datasets.load_dataset`` reads (parquet...).
        data_format: ``auto`` (detected from the columns), ``canonical``, ``hpdv3`` or ``pickapic``.
        columns: canonical column names (:class:`ColumnNames` or a dict of its fields).
        max_samples: keep only the first N raw rows (before filtering), for quick runs.
        image_root: folder that relative image paths are resolved against; defaults to
            ``train_data_dir``. Required for HPDv3 from the Hub (extract its image tarballs first).
        min_confidence: HPDv3 only — drop pairs whose ``confidence`` is below it (HPSv3 uses 0.95);
            ``keep_null_confidence`` says whether pairs with a null confidence are kept.
        buckets: aspect-ratio buckets (default ``BucketSet(1024, 16)``); pairs whose two images fall
            in different buckets are dropped.
        decode_check: fully decode every image once to catch truncated files (slower); when False only
            the header is read (missing files and non-images are still caught).
        num_proc: worker processes for the check pass.
        keep_rows: indices of the raw rows to read (e.g. the pairs a row-aligned filter keeps), applied before
            ``max_samples``.
        keep_ties: keep Pick-a-Pic ties (else dropped as ``gt_tie``) and add the boolean column ``tie``.

    Returns the canonical dataset (see the module docstring) and the :class:`SkipStats`; the totals are
    also logged. Raises ValueError for unknown columns or an unknown ``data_format``.
    """
    if data_format not in ("auto", *DATA_FORMATS):
        raise ValueError(f"Unknown data_format {data_format!r}; choose one of auto, {', '.join(DATA_FORMATS)}.")
    if isinstance(columns, Mapping):
        columns = ColumnNames(**columns)
    columns = columns or ColumnNames()
    image_root = image_root if image_root is not None else train_data_dir
    if dataset_name == HPDV3_HUB_ID:
        _require_image_root(image_root)  # fail before downloading the JSON
    raw = _load_raw(dataset_name, dataset_config_name, train_data_dir, data_format, split, cache_dir)
    if keep_rows is not None:
        raw = raw.select(keep_rows)
    if max_samples is not None:
        raw = raw.select(range(min(max_samples, len(raw))))
    if data_format == "auto":
        data_format = detect_format(raw.column_names, columns)
    else:
        missing = [c for c in _required_columns(columns)[data_format] if c not in raw.column_names]
        if missing:
            raise ValueError(f"data_format={data_format!r} needs columns {missing}, found {raw.column_names}.")
    if data_format == "hpdv3":
        _require_image_root(image_root)
    checker = _PairChecker(
        data_format,
        columns,
        image_root,
        min_confidence,
        keep_null_confidence,
        buckets or BucketSet(),
        decode_check,
        keep_ties,
    )
    pairs, stats = _check_pairs(
        raw, checker, num_proc, what=f"{dataset_name or train_data_dir} [{split}, {data_format}]"
    )
    return (pairs if keep_ties else pairs.remove_columns(TIE_COLUMN)), stats


def _check_pairs(
    raw: datasets.Dataset, checker: _PairChecker, num_proc: int | None, what: str
) -> tuple[datasets.Dataset, SkipStats]:
    """Run the checker over the raw table, count skips per reason, and keep the usable rows."""
    for name, feature in raw.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            raw = raw.cast_column(name, datasets.Image(decode=False))
    checked = raw.map(
        checker,
        batched=True,
        batch_size=64,
        remove_columns=raw.column_names,
        features=_CHECKED_FEATURES,
        num_proc=num_proc,
        desc="Checking preference pairs",
    )
    reasons = Counter(checked[_SKIP_COLUMN])
    kept_rows = reasons.pop("", 0)
    stats = SkipStats(kept=kept_rows, skipped=reasons)
    stats.report(f"Preference pairs from {what}")
    if not reasons:
        return checked.remove_columns(_SKIP_COLUMN), stats
    kept = checked.filter(
        lambda batch: [reason == "" for reason in batch], input_columns=_SKIP_COLUMN, batched=True, num_proc=num_proc
    )
    return kept.remove_columns(_SKIP_COLUMN), stats


def write_canonical_pairs(output_dir: str | os.PathLike[str], rows: list[dict[str, Any]], split: str = "train") -> str:
    """Write pairs ``{prompt, chosen, rejected[, weight], ...}`` to ``<split>.parquet`` with ``datasets.Image`` cells.

    The writer of the canonical schema that :func:`load_preference_dataset` reads. Images are PIL images (stored
    as PNG) or ready ``{"bytes", "path"}`` records; the first row's values decide the column types. Extra keys
    become extra columns (the training data adapter ignores them). Returns the folder.
    """
    import io  # only this writer encodes images

    def cell(value: Any) -> Any:
        if not isinstance(value, Image.Image):
            return value
        buffer = io.BytesIO()
        value.save(buffer, "PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    os.makedirs(output_dir, exist_ok=True)
    columns: dict[str, list[Any]] = {name: [] for name in rows[0]}
    for row in rows:
        for name, value in row.items():
            columns[name].append(cell(value))
    features = datasets.Features(
        {
            name: datasets.Image()
            if isinstance(value, Image.Image)
            else datasets.Value("float32" if isinstance(value, float) else "string")
            for name, value in rows[0].items()
        }
    )
    datasets.Dataset.from_dict(columns, features=features).to_parquet(os.path.join(output_dir, f"{split}.parquet"))
    return str(output_dir)


__all__.append("write_canonical_pairs")  # kept next to its definition (see __all__ at the top)
