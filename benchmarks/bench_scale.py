#!/usr/bin/env python
"""Batch scoring on Ray Data actors against one process, on the CPU: throughput for 1 and 2 workers, per-image cost.

Scores a folder of small PNGs (64x64, one prompt) with the bundled tiny-world model (`dinalrm-tiny`), in this
process (`ScoringJob.run`) and on a local Ray (`dinalrm.serving.distributed.run_on_ray`) with 1 and 2 actors of one
CPU each. This process also scores on one torch thread, as an actor does, with the local Ray up and idle, and the
runs of the engines alternate, so that each meets the same load of a shared machine. The time each scoring call
ends is recorded where it runs (`ScoringJob.record` here, the actor's call on Ray): the rows scored after the first
call, over the time they took, give the per-image cost once the engine is warm (model loaded, actors up, Ray's
per-call costs included); what came before the first call's end, less its own rows' share, is the fixed cost of a
run (actor start-up and model loading in each actor, Dataset planning), reported apart from `ray.init` and from the
single-process model loading. images/s = 1 / per-image cost.

Target: the Ray path's warm per-image cost at 1 worker within 1.15x of the single-process path on 200 images.
On a shared machine the figures move with the other load: take the fastest of several runs (`--repeats`).

    python benchmarks/bench_scale.py [--quick] [--images 200] [--repeats 3]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from dinalrm import bundled_asset
from dinalrm.serving import distributed
from dinalrm.serving.distributed import ray_session, run_on_ray
from dinalrm.serving.scoring import ScoringJob, ScoringSettings, load_scoring_pipeline
from dinalrm.testing import torch_threads


PROMPT = "a small red circle at the left on a white background"


def save_images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"image_{index:04d}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


class TimedBatchScorer(distributed.BatchScorer):
    """The Ray actor, writing when each of its calls ends and how many rows it scored to `marks` (one JSON line)."""

    marks = ""

    def __call__(self, units):
        result = super().__call__(units)
        with open(self.marks, "a") as file:
            file.write(json.dumps([time.time(), sum(len(indices) for indices in units["indices"].to_pylist())]) + "\n")
        return result


def costs(marks: list[tuple[float, int]], start: float) -> tuple[float, float]:
    """`(warm seconds per image, fixed seconds)` from `(time a call ended, rows it scored)` of a run that began at
    `start`: the rows after the first call over the time they took, and what came before less its own rows' share."""
    marks = sorted(marks)
    (first, first_rows), (last, _) = marks[0], marks[-1]
    per_image = (last - first) / sum(rows for _, rows in marks[1:])
    return per_image, first - start - first_rows * per_image


def single_process_run(job: ScoringJob, pipe, settings) -> tuple[float, float]:
    marks = []
    record = job.record

    def timed_record(indices, rewards, normalized):  # called right after each batch is scored
        record(indices, rewards, normalized)
        marks.append((time.time(), len(indices)))

    job.record = timed_record
    start = time.time()
    job.run(pipe, settings, progress=False)
    return costs(marks, start)


def ray_run(job: ScoringJob, settings, model: str, workers: int, marks: Path) -> tuple[float, float]:
    marks.unlink(missing_ok=True)
    TimedBatchScorer.marks = str(marks)
    start = time.time()
    run_on_ray(job, settings, model, None, "float32", num_workers=workers, progress=False)
    return costs([tuple(json.loads(line)) for line in marks.read_text().splitlines()], start)


def fastest(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The run with the lowest per-image cost (the least disturbed on a shared machine)."""
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (the fastest counts)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="one run per measurement")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    model = str(bundled_asset("dinalrm-tiny"))
    settings = ScoringSettings(t=0.4, batch_size=args.batch_size, normalize="display")
    with tempfile.TemporaryDirectory() as folder:
        paths = save_images(Path(folder) / "images", args.images)

        def job() -> ScoringJob:
            return ScoringJob.from_inputs(paths, prompt=PROMPT)

        start = time.perf_counter()
        pipe = load_scoring_pipeline(model, None, torch.float32).pipe
        load = time.perf_counter() - start
        pipe.set_progress_bar_config(disable=True)
        distributed.BatchScorer = TimedBatchScorer  # what run_on_ray maps with
        marks = Path(folder) / "marks.jsonl"
        start = time.perf_counter()
        with ray_session(num_cpus=2), torch_threads(1):
            ray_start = time.perf_counter() - start
            job().run(pipe, settings, progress=False)  # warm-up
            runs = {"single": [], 1: [], 2: []}
            for _ in range(repeats):  # interleaved, so that every engine meets the same load of a shared machine
                runs["single"].append(single_process_run(job(), pipe, settings))
                for workers in (1, 2):
                    runs[workers].append(ray_run(job(), settings, model, workers, marks))
        single, _ = fastest(runs["single"])
        on_ray = {workers: fastest(runs[workers]) for workers in (1, 2)}

    print(
        f"{args.images} images of 64x64, batch {args.batch_size}, tiny-world model, CPU, fastest of {repeats} run(s)"
    )
    print(f"single process: model loading {load:.2f} s, {1000 * single:.2f} ms/image warm, {1 / single:.1f} images/s")
    print(f"ray.init (local, 2 CPUs): {ray_start:.2f} s")
    for workers, (per_image, fixed) in on_ray.items():
        print(f"Ray, {workers} worker(s): {1000 * per_image:.2f} ms/image warm, {1 / per_image:.1f} images/s; "
              f"fixed cost per run (actors start, models load, planning) {fixed:.2f} s")  # fmt: skip
    print(f"2 workers / 1 worker throughput: {on_ray[1][0] / on_ray[2][0]:.2f}x")
    print(f"Ray at 1 worker / single process, per image warm: {on_ray[1][0] / single:.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
