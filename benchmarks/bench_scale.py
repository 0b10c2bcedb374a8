#!/usr/bin/env python
"""Batch scoring on Ray Data actors against one process, on the CPU: throughput for 1 and 2 workers, per-image cost.

Scores folders of small PNGs (64x64, one prompt) with the bundled tiny-world model (`dinalrm-tiny`), once in this
process (`ScoringJob.run`) and on a local Ray (`dinalrm.serving.distributed.run_on_ray`) with 1 and 2 actors of one
CPU each (this process also scores on one torch thread, as an actor does). Every run is timed on `--images` images
and on a fifth of them; the difference removes what does not grow with the images, so

- per-image cost = (time(N) - time(N/5)) / (N - N/5), once the model is loaded and the actors are up ("warm");
- the fixed cost of a Ray run (actor start-up and model loading in each actor, Dataset planning) is the rest,
  reported apart from `ray.init` and from the single-process model loading;
- images/s = 1 / per-image cost, for 1 and 2 workers, and their ratio, from the same run of this script.

Target: the Ray path's per-image cost at 1 worker within 1.15x of the single-process path on 200 images.

    python benchmarks/bench_scale.py [--quick] [--images 200] [--repeats 3]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from dinalrm import bundled_asset
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


def timed(run, repeats: int) -> float:
    """The fastest of `repeats` runs, in seconds (the machine may be shared: the minimum is the least disturbed)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


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
        sizes = {"all": args.images, "fifth": max(args.images // 5, args.batch_size)}

        def job(n: int) -> ScoringJob:
            return ScoringJob.from_inputs(paths[:n], prompt=PROMPT)

        with torch_threads(1):
            start = time.perf_counter()
            pipe = load_scoring_pipeline(model, None, torch.float32).pipe
            load = time.perf_counter() - start
            pipe.set_progress_bar_config(disable=True)
            job(sizes["fifth"]).run(pipe, settings, progress=False)  # warm-up
            single = {name: timed(lambda n=n: job(n).run(pipe, settings, progress=False), repeats) for name, n in
                      sizes.items()}  # fmt: skip

        start = time.perf_counter()
        with ray_session(num_cpus=2):
            ray_start = time.perf_counter() - start
            on_ray = {}
            for workers in (1, 2):
                for name, n in sizes.items():

                    def run(n=n, workers=workers):
                        run_on_ray(job(n), settings, model, None, "float32", num_workers=workers, progress=False)

                    on_ray[workers, name] = timed(run, repeats)

    marginal = sizes["all"] - sizes["fifth"]

    def per_image(times: dict, key=()) -> float:
        return (times[(*key, "all") if key else "all"] - times[(*key, "fifth") if key else "fifth"]) / marginal

    single_cost = per_image(single)
    ray_cost = {workers: per_image(on_ray, (workers,)) for workers in (1, 2)}
    fixed = {workers: on_ray[workers, "all"] - sizes["all"] * ray_cost[workers] for workers in (1, 2)}
    print(f"{args.images} images of 64x64, batch {args.batch_size}, tiny-world model, CPU, {repeats} run(s) each")
    print(f"single process: model loading {load:.2f} s, {1000 * single_cost:.2f} ms/image warm, "
          f"{1 / single_cost:.1f} images/s")  # fmt: skip
    print(f"ray.init (local, 2 CPUs): {ray_start:.2f} s")
    for workers in (1, 2):
        print(f"Ray, {workers} worker(s): {1000 * ray_cost[workers]:.2f} ms/image warm, {1 / ray_cost[workers]:.1f} "
              f"images/s; fixed cost per run (actors, model loading, planning) {fixed[workers]:.2f} s")  # fmt: skip
    print(f"2 workers / 1 worker throughput: {ray_cost[1] / ray_cost[2]:.2f}x")
    print(f"Ray at 1 worker / single process, per image warm: {ray_cost[1] / single_cost:.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
