#!/usr/bin/env python
"""Seconds per training step and peak memory of `train_dinalrm.py`'s step on a medium config.

Compares, side by side in one run:
- cached features vs raw images (VAE + three text encoders every step), both with one batched pair forward;
- one batched chosen+rejected forward vs two forwards (chosen, then rejected), both from cached features;
- gradient checkpointing (`--gradient_checkpointing`) vs none, both from cached features.

Each (scenario, repeat) runs in a fresh process, so that peak memory is its own; scenarios are interleaved across
repeats so that load from other processes hits them alike. Reported: the median over repeats of the median step
time, and of the memory a step adds on top of what is held before it (model, optimizer state, data): on CPU the
highest resident set size seen while stepping minus the one before, on CUDA the peak allocated minus the
allocated before; "peak" is that highest resident set (CUDA: peak allocated) itself.

    python benchmarks/bench_train.py [--repeats 3] [--steps 5] [--pairs_per_batch 4] [--image_size 128]
"""

import argparse
import multiprocessing
import resource
import statistics
import tempfile
import time
from pathlib import Path


SCENARIOS = {
    "cached, one batched forward": ("cached", "batched"),
    "cached, two forwards": ("cached", "two"),
    "raw images, one batched forward": ("raw", "batched"),
    "cached, gradient checkpointing": ("cached", "checkpointed"),
}


def training_args(
    root: Path, options: argparse.Namespace, cached: bool, gradient_checkpointing: bool = False
) -> argparse.Namespace:
    from train_dinalrm import parse_args

    flags = [
        "--pretrained_model_name_or_path",
        str(root / "sd3"),
        "--train_data_dir",
        str(root / "data"),
        "--output_dir",
        str(root / "out"),
        "--num_backbone_layers",
        "4",
        "--visual_layers",
        "2,4",
        "--text_layers",
        "2,4",
        "--head_num_heads",
        "4",
        "--lora_rank",
        "16",
        "--lora_alpha",
        "32",
        "--resolution",
        str(options.image_size),
        "--max_sequence_length",
        str(options.max_sequence_length),
        "--train_batch_size",
        str(options.pairs_per_batch),
        "--learning_rate",
        "1e-4",
    ]
    flags += ["--cache_dir", str(root / "cache")] if cached else []
    return parse_args(flags + (["--gradient_checkpointing"] if gradient_checkpointing else []))


def prepare(root: Path, options: argparse.Namespace) -> None:
    """Medium SD3 folder, a small dataset at the benchmark size, and its feature cache (all on disk)."""
    import torch
    from accelerate import Accelerator

    from dinalrm.testing import save_tiny_sd3_pipeline, write_tiny_preference_dataset
    from train_dinalrm import build_reward_model, data_sources

    save_tiny_sd3_pipeline(root / "sd3", size="medium")
    write_tiny_preference_dataset(
        root / "data",
        "canonical",
        num_pairs=options.pairs_per_batch * 4,
        size=(options.image_size, options.image_size),
        bad_rows=False,
    )
    args = training_args(root, options, cached=True)
    args.precompute_features = True
    accelerator = Accelerator(cpu=options.device == "cpu")
    data_sources(args, accelerator, build_reward_model(args).to(accelerator.device), torch.float32)


def run_scenario(name: str, root: str, options: argparse.Namespace, queue) -> None:
    import torch
    from accelerate import Accelerator

    from dinalrm.training.buckets import BucketBatchSampler
    from dinalrm.training.pair_datasets import encode_image_pairs
    from dinalrm.training.utils import preference_step, seeded_generator
    from modeling_dinalrm import DiNaLRMOutput
    from train_dinalrm import build_reward_model, data_sources

    class TwoForwards(torch.nn.Module):
        """Scores the chosen half and the rejected half of the pair batch in two separate forwards."""

        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, noisy, t, prompt_embeds, pooled_prompt_embeds, **kwargs):
            halves = zip(*(x.chunk(2) for x in (noisy, t, prompt_embeds, pooled_prompt_embeds)))
            return DiNaLRMOutput(rewards=torch.cat([self.model(*half, **kwargs).rewards for half in halves]))

    torch.set_num_threads(options.threads)
    data, forward = SCENARIOS[name]
    accelerator = Accelerator(cpu=options.device == "cpu")
    args = training_args(
        Path(root), options, cached=data == "cached", gradient_checkpointing=forward == "checkpointed"
    )
    set_up_model = build_reward_model(args).to(accelerator.device)
    train, _, collate_fn, encode, _ = data_sources(args, accelerator, set_up_model, torch.float32)
    model = TwoForwards(set_up_model) if forward == "two" else set_up_model
    context_embedded = getattr(train, "context_embedded", False)
    trainable = [p for p in set_up_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate)
    batches = BucketBatchSampler(train.buckets, args.train_batch_size, seed=0).batches()
    loader = torch.utils.data.DataLoader(train, batch_sampler=batches, collate_fn=collate_fn)
    host_batches = list(loader)

    def step(number: int) -> None:
        batch = host_batches[number % len(host_batches)]
        if encode is not None:
            batch = encode_image_pairs(batch, *encode)
        batch = {
            key: value.to(accelerator.device) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()
        }
        output = preference_step(
            model, set_up_model, batch, seeded_generator(0, number), context_embedded=context_embedded
        )
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)  # warm-up (also allocates the optimizer state)
    cuda = accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        sampler = ResidentMemorySampler()
        baseline = sampler.current()
    seconds = []
    for number in range(1, options.steps + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(number)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else sampler.stop()
    queue.put(
        {
            "seconds_per_step": statistics.median(seconds),
            "step_memory_mb": (peak - baseline) / 2**20,
            "peak_memory_mb": peak / 2**20,
            "trainable": sum(p.numel() for p in trainable),
        }
    )


class ResidentMemorySampler:
    """Highest resident set size of this process seen by a thread polling /proc every millisecond (Linux)."""

    def __init__(self):
        import threading

        self.peak = self.current()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()

    def _poll(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, self.current())

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, self.current())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="Fresh processes per scenario.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per process (after one warm-up step).")
    parser.add_argument("--pairs_per_batch", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=128, help="Square images; latents are a quarter of it.")
    parser.add_argument("--max_sequence_length", type=int, default=64, help="T5 tokens (CLIP adds 77).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process.")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="1 process per scenario, 1 timed step, 64x64 images")
    options = parser.parse_args()
    if options.quick:
        options.repeats, options.steps, options.image_size = 1, 1, 64

    context = multiprocessing.get_context("spawn")
    results: dict[str, list[dict]] = {name: [] for name in SCENARIOS}
    with tempfile.TemporaryDirectory() as root:
        prepare(Path(root), options)
        for _ in range(options.repeats):
            for name in SCENARIOS:
                queue = context.Queue()
                process = context.Process(target=run_scenario, args=(name, root, options, queue))
                process.start()
                results[name].append(queue.get())
                process.join()
                if process.exitcode:
                    raise SystemExit(f"scenario {name!r} failed with exit code {process.exitcode}")

    print(
        f"medium config: 4 of 8 SD3 blocks (width 256), LoRA rank 16, {results[next(iter(SCENARIOS))][0]['trainable']:,} "
        f"trainable parameters; {options.pairs_per_batch} pairs of {options.image_size}x{options.image_size} images per "
        f"step; {options.device}, {options.threads} thread(s); median of {options.repeats} processes x {options.steps} steps"
    )
    print(f"{'scenario':<34}{'s/step':>10}{'step memory (MB)':>20}{'peak (MB)':>12}")
    medians = {}
    for name, runs in results.items():
        seconds = statistics.median(r["seconds_per_step"] for r in runs)
        memory = statistics.median(r["step_memory_mb"] for r in runs)
        peak = statistics.median(r["peak_memory_mb"] for r in runs)
        medians[name] = (seconds, memory)
        print(f"{name:<34}{seconds:>10.3f}{memory:>20.1f}{peak:>12.1f}")
    cached, two, raw, checkpointed = (medians[name] for name in SCENARIOS)
    print(f"raw images / cached features: {raw[0] / cached[0]:.2f}x time, {raw[1] / max(cached[1], 1e-9):.2f}x memory")
    print(
        f"two forwards / one batched forward: {two[0] / cached[0]:.2f}x time, {two[1] / max(cached[1], 1e-9):.2f}x memory"
    )
    print(
        f"gradient checkpointing / none: {checkpointed[0] / cached[0]:.2f}x time, "
        f"{checkpointed[1] / max(cached[1], 1e-9):.2f}x memory"
    )


if __name__ == "__main__":
    main()
