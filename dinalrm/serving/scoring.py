"""The batch-scoring job behind `dinalrm score`: rows in, scores, ranks and pair probabilities out, resume.

A row is one image scored against one prompt, optionally one side of a preference pair. Rows come from image files,
folders, glob patterns or a `--pairs`/`--prompts` table; bad rows (missing or unreadable image, empty prompt) are
counted skips. The output file (CSV or JSON Lines; Parquet through a JSON Lines sidecar `<output>.partial.jsonl`,
as Parquet cannot be appended to) is streamed batch by batch, and its settings live in a sidecar
`<output>.settings.json`: a second run with the same settings skips the rows already written (a row is keyed by
image, prompt and occurrence), a run with other settings is refused. When every row is scored the file is rewritten
once, atomically, in input order with the per-prompt ranks and pair probabilities, so an interrupted and resumed run
gives the same bytes as an uninterrupted one.

The job is engine-independent; only the loop that calls the pipeline is not:

    job = ScoringJob.from_inputs(["gen/"], prompt="a cat")        # rows, bad ones counted in job.skips
    job.open_output("scores.csv", "csv", settings.resume_key(model, base, dtype))
    job.run(pipe, settings)                                       # or: your own loop over job.pending_batches()
    table = job.finish(probability)                               # ranks, P(a preferred), the final file

Another engine (a Ray Data pipeline, say) reuses the rows, the per-prompt noise rule ([`score_images`]: one fresh
generator from the seed per prompt batch) and the writer: it scores `job.pending_batches(batch_size)` its own way and
hands each batch back through `job.record(indices, rewards, normalized)`. [`score_rows`] is the one-call version.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dinalrm import bundled_asset
from dinalrm.data import MISSING, ImageLoadError


logger = logging.getLogger(__name__)

COLUMNS = ("image", "prompt", "reward", "normalized", "rank", "pair", "side", "p_preferred")
# Files a folder contributes (a glob pattern contributes every file it matches).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
NO_MATCH = "no_match"
EMPTY_FOLDER = "empty_folder"
NONFINITE_REWARD = "nonfinite_reward"
SETTINGS_SUFFIX = ".settings.json"
# Output formats; a Parquet file is written whole at the end, its rows streamed to `<output>.partial.jsonl` until then.
OUTPUT_FORMATS = ("csv", "jsonl", "parquet")
PARTIAL_SUFFIX = ".partial.jsonl"
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

    def merge(self, counts: dict[str, int], examples: list[str]) -> None:
        """Adds the skips another process counted (`counts` by reason and its examples)."""
        self.counts.update(counts)
        self.examples.extend(examples[: max(0, 3 - len(self.examples))])

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
        if file_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format {file_format!r} is not one of {', '.join(OUTPUT_FORMATS)}.")
        if file_format == "parquet":
            try:
                import pyarrow.parquet  # noqa: F401 - checked before any row is scored
            except ImportError:
                raise ValueError(
                    "Parquet output needs pyarrow: pip install pyarrow, or write .csv / .jsonl."
                ) from None
        self.path, self.format, self.settings = path, file_format, settings
        self.settings_path = path + SETTINGS_SUFFIX
        # Where scored rows are streamed: the file itself, or for Parquet a JSON Lines sidecar.
        self.stream_path, self.stream_format = (path, file_format) if file_format != "parquet" else (
            path + PARTIAL_SUFFIX, "jsonl"
        )  # fmt: skip
        if overwrite:
            for stale in (path, self.settings_path, self.stream_path):
                if os.path.exists(stale):
                    os.remove(stale)
        self.rows = self._resume()

    def _resume(self) -> list[dict]:
        """Rows already in the file (a torn last line is cut off); raises ValueError for other settings."""
        existing = [path for path in dict.fromkeys([self.path, self.stream_path]) if os.path.exists(path)]
        if not existing:
            return []
        if not os.path.exists(self.settings_path):
            raise ValueError(
                f"{existing[0]} exists but was not written by dinalrm score (no {self.settings_path}): pass another "
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
        rows = []
        if self.format == "parquet" and os.path.exists(self.path):  # a finished file, perhaps given more rows now
            rows = self._unreadable_guard(self.path, "parquet", lambda: _read_parquet(self.path))
        if not os.path.exists(self.stream_path):
            return rows
        data = Path(self.stream_path).read_bytes()
        streamed, length = self._unreadable_guard(
            self.stream_path, self.stream_format, lambda: _complete_records(data, self.stream_format)
        )
        if length < len(data):
            logger.warning("%s: dropped a torn last line (the run was interrupted while writing it)", self.stream_path)
            with open(self.stream_path, "r+b") as file:
                file.truncate(length)
        return rows + streamed

    @staticmethod
    def _unreadable_guard(path: str, file_format: str, read):
        try:
            return read()
        except (ValueError, TypeError, KeyError, OSError) as err:  # JSONDecodeError is a ValueError; ArrowInvalid too
            raise ValueError(
                f"{path} cannot be resumed, it is not a {file_format} file as dinalrm score writes them ({err}): "
                "pass another --output, or --overwrite to start it anew."
            ) from None

    def append(self, rows: list[dict]) -> None:
        """Writes `rows` and flushes them to the operating system (they survive a killed process)."""
        if not os.path.exists(self.settings_path):
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            _write_atomically(self.settings_path, json.dumps(self.settings, indent=2) + "\n")
        new = not os.path.exists(self.stream_path) or os.path.getsize(self.stream_path) == 0
        with open(self.stream_path, "a", encoding="utf-8", newline="") as file:
            if new and self.stream_format == "csv":
                file.write(",".join(COLUMNS) + "\n")
            file.write(format_rows(rows, self.stream_format))
        self.rows.extend(rows)

    def finish(self, order: list[tuple[str, str, int]], preference_probability) -> list[dict]:
        """Rewrites the file in input order (rows of earlier inputs no longer given come last) with ranks."""
        position = {key: index for index, key in enumerate(order)}
        keyed = sorted(zip(row_keys(self.rows), self.rows), key=lambda item: position.get(item[0], len(order)))
        rows = finish_rows([row for _, row in keyed], preference_probability)
        if self.format == "parquet":
            _write_parquet_atomically(self.path, rows)
            if os.path.exists(self.stream_path):
                os.remove(self.stream_path)
            return rows
        header = ",".join(COLUMNS) + "\n" if self.format == "csv" else ""
        _write_atomically(self.path, header + format_rows(rows, self.format))
        return rows


def _parquet_schema():
    import pyarrow as pa

    numbers = {"reward": pa.float64(), "normalized": pa.float64(), "rank": pa.int64(), "pair": pa.int64()}
    numbers["p_preferred"] = pa.float64()
    return pa.schema([(name, numbers.get(name, pa.string())) for name in COLUMNS])


def _read_parquet(path: str) -> list[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if tuple(table.column_names) != COLUMNS:
        raise ValueError(f"its columns are {table.column_names}, not {list(COLUMNS)}")
    return table.to_pylist()


def _write_parquet_atomically(path: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    temporary = f"{path}.tmp-{os.getpid()}"
    pq.write_table(pa.Table.from_pylist(rows, schema=_parquet_schema()), temporary)
    with open(temporary, "rb") as file:
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8", newline="") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


# The tiny-world demo model shipped inside the package (examples/tiny_world); used when the default is unreachable.
BUNDLED_TINY_MODEL = bundled_asset("dinalrm-tiny")
NORMALIZE = {None: False, "display": True, "logistic": "logistic", "zscore": "zscore"}


@dataclass
class ScoringSettings:
    """How rows are scored: noise level(s) `t`, the seed of the scoring noise, the noise-sharing rule, the batch
    size, and the printed/written normalization (None: raw rewards, or "display", "logistic", "zscore")."""

    t: float | list[float]
    seed: int = 0
    noise_sharing: str = "prompt"
    batch_size: int = 8
    normalize: str | None = None

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {list(NORMALIZE)}, got {self.normalize!r}.")
        if self.noise_sharing not in ("prompt", "none"):
            raise ValueError(f"noise_sharing must be 'prompt' or 'none', got {self.noise_sharing!r}.")

    def resume_key(self, model: str, base: str | None, dtype: str) -> dict:
        """What an output file's rows depend on (its sidecar): a resumed run must match it. The batch size counts
        only with `noise_sharing="none"`, where the draws follow the batches."""
        model = os.path.abspath(model) if os.path.isdir(model) else model
        settings = {"model": model, "base": base, "dtype": dtype, "t": self.t, "normalize": self.normalize}
        settings |= {"seed": self.seed, "noise_sharing": self.noise_sharing}
        if self.noise_sharing == "none":
            settings["batch_size"] = self.batch_size
        return settings


def noise_levels(pipe, t: float | None = None, ensemble: list[float] | None = None) -> float | list[float]:
    """The noise level(s) to score at: `t`, or the `ensemble` levels (an empty list: the model's ensemble), or the
    model's default level."""
    if ensemble is not None:
        return ensemble or list(pipe.reward_model.config.ensemble_t)
    return t if t is not None else pipe.reward_model.config.default_t


def collect_rows(
    images: Iterable[str] = (), rows_file: str | None = None, prompt: str | None = None, skips: Skips | None = None
) -> list[Row]:
    """The rows of a `--pairs`/`--prompts` file, then of image files, folders and globs (all scored against
    `prompt`); bad ones are counted in `skips`. Raises ValueError for arguments that cannot give rows."""
    skips = skips if skips is not None else Skips()
    images = list(images)
    if images and prompt is None:
        raise ValueError("pass --prompt for the images given on the command line.")
    if prompt is not None and not prompt.strip():
        raise ValueError("--prompt is empty: pass the prompt the images were generated from.")
    rows = rows_from_file(rows_file, prompt, skips) if rows_file is not None else []
    if images:
        rows += rows_from_images(expand_images(images, skips), prompt)
    return rows


def load_row_image(row: Row, skips: Skips, header_only: bool = False):
    """The image of `row`, decoded as training and evaluation decode them (or only its header, a quick check before
    the model loads); None, counted in `skips`, if that fails."""
    from dinalrm.data import OVERSIZED, load_image, read_image_size

    try:
        return (read_image_size if header_only else load_image)(row.path)
    except ImageLoadError as err:
        hint = (
            " Downscale it first: it is resized to about 1024x1024 pixels anyway." if err.reason == OVERSIZED else ""
        )
        skips.skip(err.reason, f"cannot read image {row.image}: {err}.{hint}")
        return None


def prompt_batches(rows: list[Row], batch_size: int) -> list[list[int]]:
    """Row indices grouped by prompt (first appearance order), then cut into batches: fixed by the input alone, so
    a batch never mixes prompts and every engine scores the same batches."""
    by_prompt: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_prompt.setdefault(row.prompt, []).append(index)
    return [group[i : i + batch_size] for group in by_prompt.values() for i in range(0, len(group), batch_size)]


def score_images(
    pipe, prompt: str, images: list, settings: ScoringSettings, skips: Skips | None = None, names=None
) -> list[float | None]:
    """Raw rewards of one prompt's images. The noise rule: a fresh generator seeded with `settings.seed` per call,
    so (with `noise_sharing="prompt"`) every prompt gets the same draws whatever the batch or the engine holds. An
    image the pipeline refuses, or scores NaN/inf (a `NONFINITE_REWARD` skip: a model problem), gets None, a counted
    skip, and the others are scored alone."""
    import torch

    def score(pictures: list) -> list[float]:
        generator = torch.Generator().manual_seed(settings.seed)
        output = pipe(
            prompt,
            images=pictures,
            generator=generator,
            batch_size=len(pictures),
            t=settings.t,
            noise_sharing=settings.noise_sharing,
        )
        return output.rewards.tolist()

    skips = skips if skips is not None else Skips()
    names = names if names is not None else [str(index) for index in range(len(images))]

    def finite(rewards: list[float]) -> list[float | None]:
        for name, reward in zip(names, rewards):
            if not math.isfinite(reward):
                skips.skip(NONFINITE_REWARD, f"{name}: the model scored it {reward} (its weights hold NaN/inf?)")
        return [reward if math.isfinite(reward) else None for reward in rewards]

    try:
        return finite(score(images))
    except ValueError:  # find the image(s) at fault
        rewards = []
        for name, image in zip(names, images):
            try:
                rewards += finite(score([image]))
            except ValueError as err:
                skips.skip("unscorable_image", f"{name}: {err}")
                rewards.append(None)
        return rewards


def normalized_rewards(pipe, rewards: list[float], settings: ScoringSettings) -> list[float]:
    """`rewards` in the settings' normalization (display score when None: the output files' `normalized` column)."""
    import torch

    normalize = NORMALIZE[settings.normalize] if settings.normalize else True
    return pipe.normalize_rewards(torch.tensor(rewards), normalize, settings.t).tolist()


class ScoringJob:
    """Rows to score, what is already done (a resumed output file), the scored rows, and the output writer.

    The loop that calls the pipeline is [`ScoringJob.run`] here; another engine scores `pending_batches()` itself
    with [`score_images`] and hands the results to `record()`. `finish()` adds ranks and pair probabilities.
    """

    def __init__(
        self, rows: list[Row], skips: Skips | None = None, n_input: int | None = None, sources: Iterable[str] = ()
    ) -> None:
        self.rows = rows
        self.sources = list(sources)  # input files besides the images (a rows file): never an output
        self.skips = skips if skips is not None else Skips()
        self.n_input = n_input if n_input is not None else len(rows) + self.skips.n_skipped
        self.keys = row_keys(rows)
        self.output: OutputFile | None = None
        self.done: set = set()
        self.scored: dict = {}

    @classmethod
    def from_inputs(
        cls, images: Iterable[str] = (), rows_file: str | None = None, prompt: str | None = None
    ) -> ScoringJob:
        """The rows of files, folders, globs and a rows file whose image headers read (see [`collect_rows`]);
        raises ValueError (FileNotFoundError for a missing rows file) when the arguments give none."""
        skips = Skips()
        rows = collect_rows(images, rows_file, prompt, skips)
        n_input = len(rows) + skips.n_skipped
        rows = [row for row in rows if load_row_image(row, skips, header_only=True) is not None]
        if not rows:
            raise ValueError(f"no image to score: {skips.summary(n_input)}")
        return cls(rows, skips, n_input, [rows_file] if rows_file is not None else [])

    def open_output(self, path: str, file_format: str, settings: dict, overwrite: bool = False) -> None:
        """Streams scored rows to `path`, resuming it if it was written with the same `settings` (ValueError
        otherwise, or if it is not such a file, or if it is one of the job's inputs)."""
        check_output_is_not_an_input(path, [row.path for row in self.rows] + self.sources)
        self.output = OutputFile(path, file_format, settings, overwrite)
        self.done = set(row_keys(self.output.rows))

    def pending_batches(self, batch_size: int) -> list[list[int]]:
        """The prompt batches (see [`prompt_batches`]) that hold a row not done yet."""
        batches = prompt_batches(self.rows, batch_size)
        return [batch for batch in batches if any(self.keys[i] not in self.done for i in batch)]

    def n_pending(self, batches: list[list[int]]) -> int:
        return sum(self.keys[i] not in self.done for batch in batches for i in batch)

    def load_images(self, batch: list[int]) -> tuple[list[int], list]:
        """The indices of `batch` whose image decodes, and those images (the others are counted skips)."""
        images = {index: load_row_image(self.rows[index], self.skips) for index in batch}
        members = [index for index in batch if images[index] is not None]
        return members, [images[index] for index in members]

    def record(self, indices: list[int], rewards: list[float | None], normalized: list[float]) -> None:
        """Keeps scored rows (None rewards are dropped; `normalized` is aligned with the others) and appends the
        new ones to the output file."""
        kept = [(index, reward) for index, reward in zip(indices, rewards) if reward is not None]
        new = []
        for (index, reward), value in zip(kept, normalized):
            self.scored[self.keys[index]] = entry = output_row(self.rows[index], reward, value)
            if self.keys[index] not in self.done:
                new.append(entry)
        if self.output is not None and new:
            self.output.append(new)

    def run(self, pipe, settings: ScoringSettings, progress: bool | None = None, desc: str = "dinalrm score") -> None:
        """Scores the pending batches with `pipe` in this process (progress bar on stderr; None: when a terminal)."""
        import sys

        from tqdm.auto import tqdm

        batches = self.pending_batches(settings.batch_size)
        disable = None if progress is None else not progress
        with tqdm(total=self.n_pending(batches), unit="img", desc=desc, disable=disable, file=sys.stderr) as bar:
            for batch in batches:
                members, images = self.load_images(batch)
                if members:
                    names = [self.rows[index].image for index in members]
                    rewards = score_images(pipe, self.rows[members[0]].prompt, images, settings, self.skips, names)
                    kept = [reward for reward in rewards if reward is not None]
                    self.record(members, rewards, normalized_rewards(pipe, kept, settings) if kept else [])
                bar.update(sum(self.keys[i] not in self.done for i in batch))

    def finish(self, preference_probability) -> list[dict]:
        """The scored rows in input order with per-prompt ranks and pair probabilities; with an output file, that
        file rewritten once in the same order (rows of earlier runs no longer given come last).
        `preference_probability(first_rewards, second_rewards)` gives P(first preferred) per pair (see
        `DiNaLRMPipeline.preference_probability`). Raises ValueError when no row could be scored."""
        if self.output is not None:
            if not self.output.rows:
                raise ValueError(f"no row could be scored; {self.output.path} was not written.")
            return self.output.finish(self.keys, preference_probability)
        if not self.scored:
            raise ValueError("no row could be scored.")
        return finish_rows([self.scored[key] for key in self.keys if key in self.scored], preference_probability)


def pipeline_probability(pipe, t):
    """`preference_probability(first, second)` for [`ScoringJob.finish`], of lists of raw rewards scored at `t`."""
    import torch

    def probability(first: list[float], second: list[float]) -> list[float]:
        return pipe.preference_probability(torch.tensor(first), torch.tensor(second), t).tolist()

    return probability


def score_rows(pipe, rows: list[Row], settings: ScoringSettings, output: OutputFile | None = None) -> list[dict]:
    """Scores `rows` with `pipe` in one call: the output columns (`COLUMNS`) per scored row, in input order, with
    ranks and pair probabilities; with `output`, streamed to that file and resumed from it."""
    job = ScoringJob(rows)
    if output is not None:
        job.output, job.done = output, set(row_keys(output.rows))
    job.run(pipe, settings, progress=False)
    return job.finish(pipeline_probability(pipe, settings.t))


class ModelUnavailableError(OSError):
    """The model could not be loaded (and no fallback applied); `hub_hint` says whether downloading would help."""

    def __init__(self, model: str, reason: str, hub_hint: bool) -> None:
        super().__init__(f"could not load the DiNa-LRM model {model!r}: {reason}")
        self.model, self.reason, self.hub_hint = model, reason, hub_hint


@dataclass
class LoadedModel:
    """A loaded scoring pipeline; `fallback_reason` is set when the default model was unreachable and the bundled
    demo model (`BUNDLED_TINY_MODEL`) was loaded instead."""

    pipe: object
    name: str
    fallback_reason: str | None = None

    @property
    def source(self) -> str:
        """What was actually loaded (the demo model's folder after a fallback)."""
        return str(BUNDLED_TINY_MODEL) if self.fallback_reason else self.name


def load_scoring_pipeline(model: str | None, base: str | None, dtype) -> LoadedModel:
    """Loads `model` (default: the published checkpoint, official layout, on `base`); without an explicit model,
    falls back to the bundled demo model when the default cannot be loaded. Raises ModelUnavailableError."""
    from huggingface_hub.errors import HFValidationError

    from dinalrm import DEFAULT_MODEL
    from modeling_dinalrm import looks_like_local_path
    from pipeline_dinalrm import DiNaLRMPipeline

    name = model or DEFAULT_MODEL
    try:
        return LoadedModel(DiNaLRMPipeline.from_pretrained(name, base_model=base, torch_dtype=dtype), name)
    except (OSError, HFValidationError, ValueError) as err:  # ValueError: ConversionError, not a DiNa-LRM folder
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        if model is None and BUNDLED_TINY_MODEL.is_dir():
            logger.info("%s could not be loaded (%s): loading the bundled demo model", name, reason)
            pipe = DiNaLRMPipeline.from_pretrained(BUNDLED_TINY_MODEL, torch_dtype=dtype)
            return LoadedModel(pipe, name, fallback_reason=reason)
        # a local folder is not downloaded: the reason says what is wrong
        raise ModelUnavailableError(name, reason, hub_hint=not looks_like_local_path(name)) from err


def device_problem(device: str) -> str | None:
    """Why `device` cannot be used here, or None."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        return f"--device {device!r} is not a device name: use cpu, cuda, cuda:1 or mps."
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(kind, lambda: True)
    if not available():
        return f"--device {device} was asked for, but no {kind} device is available here: pass --device cpu."
    return None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    """bfloat16 where users run (CUDA), float32 on the CPU (where bfloat16 is slow)."""
    return "bfloat16" if device.startswith("cuda") else "float32"
