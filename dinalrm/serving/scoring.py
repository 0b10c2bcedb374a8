"""Batch scoring for `dinalrm-score`: the rows to score, the output file that resumes, ranks and pair verdicts.

A row is one image scored against one prompt, optionally one side of a preference pair. Rows come from image files,
folders, glob patterns or a `--pairs` table; bad rows (missing or unreadable image, empty prompt) are counted skips.
The output file (CSV or JSON Lines) is streamed batch by batch, and its settings live in a sidecar
`<output>.settings.json`: a second run with the same settings skips the rows already written (a row is keyed by
image, prompt and occurrence), a run with other settings is refused. When every row is scored the file is rewritten
once, atomically, in input order with the per-prompt ranks and pair probabilities, so an interrupted and resumed run
gives the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dinalrm.data import MISSING, ImageLoadError


logger = logging.getLogger(__name__)

COLUMNS = ("image", "prompt", "reward", "normalized", "rank", "pair", "side", "p_preferred")
# Files a folder contributes (a glob pattern contributes every file it matches).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
NO_MATCH = "no_match"
EMPTY_FOLDER = "empty_folder"
NONFINITE_REWARD = "nonfinite_reward"
SETTINGS_SUFFIX = ".settings.json"
# The image columns of the pair schemas `dinalrm.data` reads, first the side that is labelled preferred.
PAIR_COLUMNS = {"canonical": ("chosen", "rejected"), "hpdv3": ("path1", "path2")}


@dataclass(frozen=True)
class Row:
    """One image to score for one prompt; `image` is the path as the user gave it (the output's key)."""

    image: str
    path: str
    prompt: str
    pair: int | None = None
    side: str | None = None


def output_row(row: Row, reward: float, normalized: float) -> dict:
    """The output columns of a scored row; `rank` and `p_preferred` are filled in when all rows are scored."""
    values = (row.image, row.prompt, reward, normalized, None, row.pair, row.side, None)
    return dict(zip(COLUMNS, values))


def row_keys(rows: Iterable) -> list[tuple[str, str, int]]:
    """`(image, prompt, occurrence)` of each row (rows or output dicts): repeated rows stay distinct."""
    seen: Counter = Counter()
    keys = []
    for row in rows:
        image, prompt = (row.image, row.prompt) if isinstance(row, Row) else (row["image"], row["prompt"])
        keys.append((image, prompt, seen[image, prompt]))
        seen[image, prompt] += 1
    return keys


class Skips:
    """Rows dropped per reason, with the first few examples, so that one warning names what to fix."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    @property
    def n_skipped(self) -> int:
        return sum(self.counts.values())

    def skip(self, reason: str, example: str, n: int = 1) -> None:
        self.counts[reason] += n
        if len(self.examples) < 3:
            self.examples.append(example)

    def summary(self, total: int) -> str:
        reasons = ", ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items()))
        return f"skipped {self.n_skipped} of {total} rows ({reasons}): " + "; ".join(self.examples)


def expand_images(specs: list[str], skips: Skips) -> list[str]:
    """Image paths of files, folders (recursive, image suffixes only, sorted) and glob patterns (sorted)."""
    paths = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(str(p) for p in Path(spec).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            found = [path for path in found if os.path.isfile(path)]
            if not found:
                skips.skip(EMPTY_FOLDER, f"{spec}: the folder holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
            paths.extend(found)
        elif glob.has_magic(spec) and not os.path.exists(spec):
            matches = sorted(path for path in glob.glob(spec, recursive=True) if os.path.isfile(path))
            if not matches:
                skips.skip(NO_MATCH, f"{spec}: no file matches this pattern")
            paths.extend(matches)
        else:
            paths.append(spec)
    return paths


def check_output_is_not_an_input(output: str, inputs: Iterable[str]) -> None:
    """Raises ValueError when `--output` (or its settings sidecar) is one of the input files (paths resolved, links
    followed): writing it would replace what is being read."""
    targets = {os.path.realpath(output), os.path.realpath(output + SETTINGS_SUFFIX)}
    for path in inputs:
        if os.path.realpath(path) in targets:
            raise ValueError(
                f"--output {output} is the input file {path}: writing the scores there would replace it. Pass another "
                "--output."
            )


def rows_from_images(paths: list[str], prompt: str) -> list[Row]:
    return [Row(image=path, path=path, prompt=prompt) for path in paths]


def rows_from_file(rows_file: str, prompt: str | None, skips: Skips) -> list[Row]:
    """Rows of a `--pairs` table: `prompt,image` rows or preference pairs (canonical or HPDv3 schema)."""
    try:  # the training data's readers, which need the `datasets` library
        from dinalrm.data import EMPTY_PROMPT, detect_format, image_record, load_table_file
    except ImportError as err:
        raise ValueError(f"--pairs/--prompts files are read with `datasets`: pip install datasets ({err}).") from None
    table = load_table_file(rows_file)
    columns = set(table.column_names)
    root = os.path.dirname(os.path.abspath(rows_file))
    if "image" in columns:
        if "prompt" not in columns and prompt is None:
            raise ValueError(f"{rows_file} has no `prompt` column: add one, or pass --prompt for all its images.")
        sides = [("image", None)]
    else:
        try:
            data_format = detect_format(columns)
        except ValueError as err:
            raise ValueError(f"{rows_file}: {err} For single images use the columns prompt,image.") from None
        if data_format not in PAIR_COLUMNS:
            raise ValueError(f"{rows_file}: {data_format} rows embed their images; --pairs reads image paths.")
        first, second = PAIR_COLUMNS[data_format]
        sides = [(first, "a"), (second, "b")]
    rows = []
    for index, record in enumerate(table):
        text = record.get("prompt", prompt)
        text = prompt if text is None and "prompt" not in columns else text
        if not isinstance(text, str) or not text.strip():
            skips.skip(EMPTY_PROMPT, f"{rows_file} row {index + 1}: empty prompt", len(sides))
            continue
        try:
            paths = [
                (record[column], image_record(record[column], root, absolute_anywhere=True)["path"], side)
                for column, side in sides
            ]
        except (ImageLoadError, TypeError) as err:
            skips.skip(getattr(err, "reason", MISSING), f"{rows_file} row {index + 1}: {err}", len(sides))
            continue
        pair = index if sides[0][1] else None
        rows.extend(Row(image=str(given), path=path, prompt=text, pair=pair, side=side) for given, path, side in paths)
    return rows


def competition_ranks(rewards: list[float]) -> list[int]:
    """1 for the highest reward; equal rewards share the better rank (1, 2, 2, 4)."""
    ordered = sorted(rewards, reverse=True)
    first = {}
    for position, reward in enumerate(ordered, start=1):
        first.setdefault(reward, position)
    return [first[reward] for reward in rewards]


def finish_rows(rows: list[dict], preference_probability) -> list[dict]:
    """Adds the per-prompt `rank` and, where both sides of a pair were scored, `p_preferred` (of this side)."""
    by_prompt: dict[str, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt"], []).append(row)
    for members in by_prompt.values():
        for row, rank in zip(members, competition_ranks([row["reward"] for row in members])):
            row["rank"] = rank
    sides: dict[tuple, dict] = {}
    for row in rows:
        row["p_preferred"] = None
        if row["pair"] is not None:
            sides[row["prompt"], row["pair"], row["side"]] = row
    pairs = [(a, sides.get((prompt, pair, "b"))) for (prompt, pair, side), a in sides.items() if side == "a"]
    pairs = [(a, b) for a, b in pairs if b is not None]
    if pairs:
        first = [a["reward"] for a, _ in pairs] + [b["reward"] for _, b in pairs]
        second = [b["reward"] for _, b in pairs] + [a["reward"] for a, _ in pairs]
        probabilities = preference_probability(first, second)
        for row, probability in zip([a for a, _ in pairs] + [b for _, b in pairs], probabilities):
            row["p_preferred"] = probability
    return rows


def _cell(value) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def format_rows(rows: list[dict], file_format: str) -> str:
    """Lines of `rows` (each ending in a newline); CSV without its header."""
    if file_format == "jsonl":
        return "".join(json.dumps({name: row.get(name) for name in COLUMNS}) + "\n" for row in rows)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([[_cell(row.get(name)) for name in COLUMNS] for row in rows])
    return buffer.getvalue()


def _parse_csv_row(values: list[str]) -> dict:
    def number(kind, text):
        return None if text == "" else kind(text)

    image, prompt, reward, normalized, rank, pair, side, p_preferred = values
    values = (image, prompt, float(reward), float(normalized), number(int, rank), number(int, pair), side or None)
    return dict(zip(COLUMNS, (*values, number(float, p_preferred))))


def _complete_records(data: bytes, file_format: str) -> tuple[list[dict], int]:
    """The rows of an output file's complete records and their length in bytes: a record cut short by a killed
    write (no final newline, or, in CSV, a quoted prompt cut after one of its own newlines) is left out."""
    lines = data[: data.rfind(b"\n") + 1].decode().splitlines(keepends=True)
    if file_format == "jsonl":
        return [json.loads(line) for line in lines], sum(len(line.encode()) for line in lines)
    ends, end = [], 0

    def feed():
        nonlocal end
        for line in lines:
            end += len(line.encode())
            yield line

    records = []
    for record in csv.reader(feed()):
        records.append(record)
        ends.append(end)
    if records and len(records[-1]) != len(COLUMNS):
        del records[-1], ends[-1]
    if records and tuple(records[0]) != COLUMNS:
        raise ValueError(f"the header is {records[0]}, not {list(COLUMNS)}")
    return [_parse_csv_row(record) for record in records[1:]], ends[-1] if ends else 0


class OutputFile:
    """The `--output` file: refuses other settings, resumes, appends batches, and is rewritten once at the end."""

    def __init__(self, path: str, file_format: str, settings: dict, overwrite: bool) -> None:
        self.path, self.format, self.settings = path, file_format, settings
        self.settings_path = path + SETTINGS_SUFFIX
        if overwrite:
            for stale in (path, self.settings_path):
                if os.path.exists(stale):
                    os.remove(stale)
        self.rows = self._resume()

    def _resume(self) -> list[dict]:
        """Rows already in the file (a torn last line is cut off); raises ValueError for other settings."""
        if not os.path.exists(self.path):
            return []
        if not os.path.exists(self.settings_path):
            raise ValueError(
                f"{self.path} exists but was not written by dinalrm-score (no {self.settings_path}): pass another "
                "--output, or --overwrite to replace it."
            )
        try:
            saved = json.loads(Path(self.settings_path).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            saved = err
        if not isinstance(saved, dict):
            detail = saved if isinstance(saved, Exception) else f"a JSON {type(saved).__name__}, not an object"
            raise ValueError(
                f"{self.settings_path}, the settings of {self.path}, is damaged ({detail}), so the rows already "
                "written cannot be trusted to match these settings: pass --overwrite to start "
                f"{self.path} anew, or another --output."
            )
        if saved != self.settings:
            changed = ", ".join(
                f"{name}: {saved.get(name)!r} -> {self.settings.get(name)!r}"
                for name in sorted(set(saved) | set(self.settings))
                if saved.get(name) != self.settings.get(name)
            )
            raise ValueError(
                f"{self.path} was written with other settings ({changed}); its rows cannot be mixed with these. "
                "Pass the same settings to resume it, another --output, or --overwrite to start it anew."
            )
        data = Path(self.path).read_bytes()
        try:
            rows, length = _complete_records(data, self.format)
        except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(
                f"{self.path} cannot be resumed, it is not a {self.format} file as dinalrm-score writes them ({err}): "
                "pass another --output, or --overwrite to start it anew."
            ) from None
        if length < len(data):
            logger.warning("%s: dropped a torn last line (the run was interrupted while writing it)", self.path)
            with open(self.path, "r+b") as file:
                file.truncate(length)
        return rows

    def append(self, rows: list[dict]) -> None:
        """Writes `rows` and flushes them to the operating system (they survive a killed process)."""
        if not os.path.exists(self.settings_path):
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            _write_atomically(self.settings_path, json.dumps(self.settings, indent=2) + "\n")
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", encoding="utf-8", newline="") as file:
            if new and self.format == "csv":
                file.write(",".join(COLUMNS) + "\n")
            file.write(format_rows(rows, self.format))
        self.rows.extend(rows)

    def finish(self, order: list[tuple[str, str, int]], preference_probability) -> list[dict]:
        """Rewrites the file in input order (rows of earlier inputs no longer given come last) with ranks."""
        position = {key: index for index, key in enumerate(order)}
        keyed = sorted(zip(row_keys(self.rows), self.rows), key=lambda item: position.get(item[0], len(order)))
        rows = finish_rows([row for _, row in keyed], preference_probability)
        header = ",".join(COLUMNS) + "\n" if self.format == "csv" else ""
        _write_atomically(self.path, header + format_rows(rows, self.format))
        return rows


def _write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8", newline="") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
