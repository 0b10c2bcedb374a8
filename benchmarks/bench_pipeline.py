#!/usr/bin/env python
"""Throughput and peak memory of DiNaLRMPipeline scoring: from images vs from latents, one level vs the ensemble.

Runs on a medium-sized random model from `dinalrm.testing` (SD3-like, backbone width 256, 4 of 8 blocks used), so
it needs no download; all configurations are measured side by side in one run, each as the median of several
timed runs after a warm-up. Scoring from images includes preprocessing and the VAE encode; prompt embeddings are
cached after the first call in both cases (as in an alignment loop).

    python benchmarks/bench_pipeline.py [--num_images 8] [--image_size 128] [--repeats 3] [--device cpu]
"""

import argparse
import ctypes
import ctypes.util
import functools
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
import PIL.Image
import psutil
import torch

from dinalrm.testing import get_tiny_dinalrm_pipeline


PROMPT = "a photo of a red cat on a table"
ENSEMBLE = [0.2, 0.5, 0.7]


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so the process RSS shows what the next run really uses."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name and hasattr(ctypes.CDLL(libc_name), "malloc_trim"):
        ctypes.CDLL(libc_name).malloc_trim(0)


class PeakMemory:
    """Peak memory above the starting point while the block runs: CUDA allocator stats, or sampled process RSS."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval, self.peak_bytes = device, interval, 0

    def _sample_rss(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self._peak_rss = max(self._peak_rss, process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            release_free_memory()
            self._start = self._peak_rss = psutil.Process().memory_info().rss
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._sampler.join()
            self.peak_bytes = self._peak_rss - self._start


def measure(run: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float]:
    """(median seconds, peak memory in MiB) of `run` over `repeats` timed runs after one warm-up."""
    run()
    seconds, peaks = [], []
    for _ in range(repeats):
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
        peaks.append(memory.peak_bytes / 2**20)
    return statistics.median(seconds), max(peaks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="2 images of 64x64, batch 2, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images, args.image_size, args.batch_size, args.repeats = 2, 64, 2, 1
    device = torch.device(args.device)

    pipe = get_tiny_dinalrm_pipeline(
        size="medium", num_layers=4, visual_layers=(2, 3, 4), text_layers=(2, 3, 4), head_num_heads=8
    ).to(device)
    rng = np.random.default_rng(0)
    shape = (args.image_size, args.image_size, 3)
    images = [PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(args.num_images)]
    latents = pipe.encode_images(images)
    config = pipe.reward_model.config
    print(
        f"medium config: backbone width {config.backbone_width}, {config.num_backbone_layers} of "
        f"{config.backbone_config['num_layers']} blocks, {args.num_images} images of {args.image_size}x"
        f"{args.image_size} -> latents {tuple(latents.shape[1:])}, batch {args.batch_size}, device {device}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'input':<8} {'levels':<16} {'images/s':>9} {'s/batch':>8} {'peak MiB':>9}")
    for name, inputs in (("images", {"images": images}), ("latents", {"latents": latents})):
        for t in (config.default_t, ENSEMBLE):
            run = functools.partial(pipe, PROMPT, t=t, batch_size=args.batch_size, **inputs)
            seconds, peak = measure(run, args.repeats, device)
            batches = -(-args.num_images // args.batch_size)
            print(f"{name:<8} {str(t):<16} {args.num_images / seconds:>9.2f} {seconds / batches:>8.2f} {peak:>9.1f}")


if __name__ == "__main__":
    main()
