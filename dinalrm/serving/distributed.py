"""Scoring past one process: the batch-scoring job and the benchmark evaluation on a pool of Ray Data actors.

Ray Data does the distribution (`map_batches` with a callable class on an actor pool): each actor loads the model
once and scores the work units it is handed; this module only cuts the work into units and gathers the results on
the driver, where the single-process code writes them (`dinalrm.serving.scoring`, `dinalrm.evaluation.runner`).

A work unit is what one process would score in one call, so every score is the one a single process gives:

- batch scoring (`score_dataset`): the prompt-grouped batches of the single-process job. Its noise rule gives each
  prompt's images one draw from a fresh generator seeded with `--seed` (the same draw for every prompt and every
  batch), so which actor scores a batch does not change it; `--noise_sharing none` draws per batch, and the units
  are those very batches, so that holds there too.
- evaluation (`benchmark_scores`): consecutive images of a benchmark; its scorers seed each image's (or prompt's)
  noise from the run seed and the image id (or prompt), independent of the batch and the process.

`ray.init` connects to the cluster named by `RAY_ADDRESS` when it is set, and starts a local Ray otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


logger = logging.getLogger(__name__)

# Ray Data's own installation hint (it lives in the `scale` extra, Ray Serve in `serve`).
INSTALL_HINT = 'Ray Data is not installed: pip install "dinalrm[scale]" (or "ray[data]>=2.9").'


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is a separate part of the `ray` package
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from None
    return ray


@contextmanager
def ray_session(num_cpus: int | None = None) -> Iterator[Any]:
    """Ray for the block: the running one if this process already started or joined it, else the cluster at
    `RAY_ADDRESS` or a local Ray with `num_cpus` CPUs (shut down again at the end). Ray Data's progress bars show
    only on a terminal."""
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")
        ray.init(
            address=address,
            num_cpus=None if address else num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


# Units per actor call: enough calls per actor to balance the pool and stream results for resuming, few enough that
# Ray's per-call cost (a task, a block) stays small next to the scoring.
CALLS_PER_WORKER = 4
MAX_UNITS_PER_CALL = 8


def map_on_actor_pool(
    units: list[dict], actor_class, constructor_kwargs: dict, num_workers: int, num_gpus_per_worker: float
):
    """The Ray Dataset of `units` mapped by `actor_class` on a pool of `num_workers` actors with
    `num_gpus_per_worker` GPUs (and one CPU) each; an actor call gets a few units as a pyarrow table."""
    ray = _ray()
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}.")
    if num_gpus_per_worker < 0:
        raise ValueError(f"num_gpus_per_worker must be 0 (CPU) or more, got {num_gpus_per_worker}.")
    per_call = max(1, min(MAX_UNITS_PER_CALL, len(units) // (CALLS_PER_WORKER * num_workers)))
    # One block per call (`batch_size=None`): a batch size would merge blocks into longer tasks whose results
    # reach the driver (and the output file) only when the whole task ends.
    return ray.data.from_items(units, override_num_blocks=-(-len(units) // per_call)).map_batches(
        actor_class,
        fn_constructor_kwargs=constructor_kwargs,
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=1,
        num_gpus=num_gpus_per_worker or None,
    )


def worker_device() -> str:
    """The device of an actor: the GPU Ray assigned it (Ray sets `CUDA_VISIBLE_DEVICES`), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# -------------------------------------------------------------------------------------------------- batch scoring
class BatchScorer:
    """A Ray Data actor: loads the scoring pipeline once, then scores work units, each one prompt batch of the job
    (`{"indices", "images", "paths", "prompt"}`), with the single-process loop (`ScoringJob.run`) on that batch."""

    def __init__(self, model: str, base: str | None, dtype: str, settings) -> None:
        import torch

        from pipeline_dinalrm import DiNaLRMPipeline

        self.pipe = DiNaLRMPipeline.from_pretrained(model, base_model=base, torch_dtype=getattr(torch, dtype))
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(worker_device())
        self.settings = settings

    def __call__(self, units):
        import json

        import pyarrow as pa

        from dinalrm.serving.scoring import Row, ScoringJob

        schema = _unit_result_schema()
        columns: dict[str, list] = {name: [] for name in schema.names}
        for unit in units.to_pylist():
            rows = [Row(image, path, unit["prompt"]) for image, path in zip(unit["images"], unit["paths"])]
            job = ScoringJob(rows)
            job.run(self.pipe, self.settings, progress=False)
            scored = [job.scored.get(key) for key in job.keys]
            columns["indices"].append(unit["indices"])
            columns["rewards"].append([None if row is None else row["reward"] for row in scored])
            columns["normalized"].append([None if row is None else row["normalized"] for row in scored])
            columns["skips"].append(json.dumps([job.skips.counts, job.skips.examples]))
        return pa.table(columns, schema=schema)


def _unit_result_schema():
    """A unit's results: per row of the unit its reward and normalized score (None: skipped), and the unit's skips
    as JSON `[counts by reason, examples]`."""
    import pyarrow as pa

    floats = pa.list_(pa.float64())
    return pa.schema(
        [("indices", pa.list_(pa.int64())), ("rewards", floats), ("normalized", floats)] + [("skips", pa.string())]
    )


def run_on_ray(
    job,
    settings,
    model: str,
    base: str | None,
    dtype: str,
    num_workers: int = 1,
    num_gpus_per_worker: float = 0,
    progress: bool | None = None,
    desc: str = "dinalrm score",
) -> None:
    """`job.run(pipe, settings)` on a pool of `num_workers` Ray Data actors that each load `model` once (call
    inside `ray_session`): the job's pending prompt batches are the work units, and every result is recorded (and
    streamed to the job's output file) here as it arrives, so a killed run resumes like a single-process one."""
    import json

    from tqdm.auto import tqdm

    batches = job.pending_batches(settings.batch_size)
    units = [
        {
            "indices": batch,
            "images": [job.rows[index].image for index in batch],
            "paths": [job.rows[index].path for index in batch],
            "prompt": job.rows[batch[0]].prompt,
        }
        for batch in batches
    ]
    if not units:
        return
    dataset = map_on_actor_pool(
        units,
        BatchScorer,
        {"model": model, "base": base, "dtype": dtype, "settings": settings},
        num_workers,
        num_gpus_per_worker,
    )
    disable = None if progress is None else not progress
    with tqdm(total=job.n_pending(batches), unit="img", desc=desc, disable=disable, file=sys.stderr) as bar:
        for result in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for unit in result.to_pylist():
                counts, examples = json.loads(unit["skips"])
                job.skips.merge(counts, examples)
                scored = [
                    (i, r, n) for i, r, n in zip(unit["indices"], unit["rewards"], unit["normalized"]) if r is not None
                ]
                job.record([i for i, _, _ in scored], [r for _, r, _ in scored], [n for _, _, n in scored])
                bar.update(sum(job.keys[index] not in job.done for index in unit["indices"]))


def score_dataset(
    inputs=(),
    *,
    model: str | None = None,
    prompt: str | None = None,
    rows_file: str | None = None,
    output: str | None = None,
    file_format: str | None = None,
    overwrite: bool = False,
    t: float | None = None,
    ensemble: list[float] | None = None,
    seed: int = 0,
    noise_sharing: str = "prompt",
    batch_size: int = 8,
    normalize: str | None = None,
    base: str | None = None,
    dtype: str | None = None,
    num_workers: int = 1,
    num_gpus_per_worker: float = 0,
) -> list[dict]:
    """`dinalrm-score --ray` in Python: the rows of `inputs` (image files, folders, globs, or a Ray Dataset with an
    `image` column and optionally `prompt`) and/or `rows_file`, scored by `num_workers` Ray Data actors.

    Returns the output columns (`scoring.COLUMNS`) per scored row in input order, with ranks and pair probabilities;
    with `output` (.csv, .jsonl or .parquet), also written there and resumed from there. This process loads the
    model once on its CPU for the default noise levels and the pair probabilities; the actors do the scoring.
    Raises ValueError for inputs that give no row to score or an output written with other settings.
    """
    import torch

    from dinalrm.serving import scoring

    if hasattr(inputs, "take_all"):  # a Ray Dataset: its rows, scored against their own prompts or `prompt`
        records = inputs.take_all()
        rows = [scoring.Row(str(r["image"]), str(r["image"]), r.get("prompt") or prompt) for r in records]
        if any(not row.prompt for row in rows):
            raise ValueError("rows without a prompt: give the Dataset a `prompt` column, or pass prompt=...")
        skips = scoring.Skips()
        n_input = len(rows)
        rows = [row for row in rows if scoring.load_row_image(row, skips, header_only=True) is not None]
        job = scoring.ScoringJob(rows, skips, n_input)
    else:
        job = scoring.ScoringJob.from_inputs(list(inputs), rows_file, prompt)
    dtype = dtype or scoring.default_dtype("cuda" if num_gpus_per_worker else "cpu")
    loaded = scoring.load_scoring_pipeline(model, base, getattr(torch, dtype))
    settings = scoring.ScoringSettings(
        t=scoring.noise_levels(loaded.pipe, t, ensemble),
        seed=seed,
        noise_sharing=noise_sharing,
        batch_size=batch_size,
        normalize=normalize or ("display" if output else None),
    )
    if output is not None:
        file_format = file_format or os.path.splitext(output)[1].lower().lstrip(".")
        job.open_output(output, file_format, settings.resume_key(loaded.source, base, dtype), overwrite)
    base = None if loaded.fallback_reason else base
    with ray_session():
        run_on_ray(job, settings, loaded.source, base, dtype, num_workers, num_gpus_per_worker, progress=False)
    if job.skips.n_skipped:
        logger.warning(job.skips.summary(job.n_input))
    return job.finish(scoring.pipeline_probability(loaded.pipe, settings.t))


# ----------------------------------------------------------------------------------------------------- evaluation
class BenchmarkScorer:
    """A Ray Data actor: builds scorer `name` once from `run_eval`'s arguments, then scores units of benchmark images
    (`{"benchmark": key, "image_ids": [...]}`) as the single-process runner does (`common.score_images`)."""

    def __init__(self, name: str, args: argparse.Namespace, benchmarks: dict, batch_size: int) -> None:
        import torch

        from dinalrm.evaluation.scorers import build_scorer

        self.scorer = build_scorer(name, args, torch.device(worker_device()))
        self.benchmarks, self.batch_size = benchmarks, batch_size

    def __call__(self, units):
        import json

        import pyarrow as pa

        from dinalrm.evaluation.common import score_images

        columns = {"benchmark": [], "image_id": [], "scores": [], "reason": []}
        for unit in units.to_pylist():
            scored = score_images(self.scorer, self.benchmarks[unit["benchmark"]], unit["image_ids"], self.batch_size)
            for image_id, scores, reason in scored:
                columns["benchmark"].append(unit["benchmark"])
                columns["image_id"].append(image_id)
                columns["scores"].append(scores)
                columns["reason"].append(reason)
        table = pa.table(
            columns,
            schema=pa.schema(
                [("benchmark", pa.string()), ("image_id", pa.string()), ("scores", pa.list_(pa.float64()))]
                + [("reason", pa.string())]
            ),
        )
        # The setting names travel with the scores: the driver never builds the scorer (nor loads its model).
        return table.append_column("settings", pa.array([json.dumps(self.scorer.setting_names)] * len(table)))


def benchmark_scores(
    name: str,
    args: argparse.Namespace,
    benchmarks: dict,
    batch_size: int,
    num_workers: int = 1,
    num_gpus_per_worker: float = 0,
) -> tuple[list[str], dict[str, list[tuple[str, list[float] | None, str | None]]]]:
    """`(setting names, {benchmark key: [(image_id, scores or None, skip reason or None)]})` of scorer `name` over
    every distinct image of `benchmarks`, scored by a pool of `num_workers` actors (call inside `ray_session`)."""
    import json

    units = [
        {"benchmark": key, "image_ids": ids[start : start + batch_size]}
        for key, benchmark in benchmarks.items()
        for ids in [list(benchmark.images)]
        for start in range(0, len(ids), batch_size)
    ]
    results: dict[str, list] = {key: [] for key in benchmarks}
    if not units:
        return [], results
    dataset = map_on_actor_pool(
        units,
        BenchmarkScorer,
        {"name": name, "args": args, "benchmarks": benchmarks, "batch_size": batch_size},
        num_workers,
        num_gpus_per_worker,
    )
    settings: list[str] = []
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            settings = settings or json.loads(row["settings"])
            results[row["benchmark"]].append((row["image_id"], row["scores"], row["reason"]))
    return settings, results
