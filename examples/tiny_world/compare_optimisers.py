"""Side-by-side comparison of generator alignment methods in the tiny world, on the held-out oracle golden metric.

    python examples/tiny_world/compare_optimisers.py --generator assets/tiny-sd3 --reward_model assets/dinalrm-tiny \\
        --pixel_reward outputs/tiny-world/metrics/pixel_baseline.safetensors --output_dir outputs/optimisers \\
        --results examples/tiny_world/results_optimisers.json --plot examples/tiny_world/optimiser_comparison.png

Runs, one after the other, LPO with DiNa-LRM (`examples/lpo/train_lpo.py`, flow path, on `--lpo_seeds`), ReFL with
DiNa-LRM (`examples/refl/train_refl.py`), Flow-GRPO with DiNa-LRM (`flow_grpo.py`) and ReFL with the pixel CNN
baseline (`train_refl.py --reward pixel`, the CNN of `pixel_baseline.py --save_model`; same settings as ReFL with
DiNa-LRM), each in its own process (wall time and peak RSS are that process's, from `os.wait4`). `--methods` runs
a subset; the other methods' runs are then kept from the existing `--results` file (whose pretrained generator
must score the same), so one arm can be re-run without the others. Every method is scored the same way, ReFL's and
Flow-GRPO's validation: ODE samples of the first `--num_validation_prompts` held-out prompts with the generator
seed 12345, read by the pixel oracle (`domain.oracle_score`); ReFL and Flow-GRPO report it during training, LPO's
checkpoints and the pretrained generator are scored here. Reward-model calls are the samples each method's training
scored (validation excluded), counted from its settings and, for LPO, its number of sampling rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline
from domain import IMAGE_SIZE, oracle_score, split_prompts
from tiny_world_common import REPO_ROOT, TOKEN_LENGTH, decode_latents, report, set_threads, tensor_to_images

from dinalrm.alignment import Sampler, SamplingSettings, encode_generator_prompts


logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
LPO_SCRIPT = REPO_ROOT / "examples" / "lpo" / "train_lpo.py"
REFL_SCRIPT = REPO_ROOT / "examples" / "refl" / "train_refl.py"
GRPO_SCRIPT = HERE / "flow_grpo.py"
#: Settings shared by every method: the tiny generator's sampler, as ReFL and Flow-GRPO run it.
STEPS, GUIDANCE = 12, 4.0
METHODS = ("lpo", "refl", "flow_grpo", "refl_pixel")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generator", required=True, help="the tiny SD3 pipeline folder")
    parser.add_argument("--reward_model", required=True, help="the tiny DiNa-LRM repo")
    parser.add_argument(
        "--pixel_reward", default=None, help="pixel CNN (pixel_baseline.py --save_model), for refl_pixel"
    )
    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run (default: all)"
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--results", required=True, help="results JSON")
    parser.add_argument("--plot", required=True, help="comparison PNG")
    parser.add_argument("--lpo_seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lpo_steps", type=int, default=36, help="LPO optimizer steps (ends at a round's end)")
    parser.add_argument("--lpo_checkpointing_steps", type=int, default=12)
    parser.add_argument("--lpo_learning_rate", type=float, default=1e-3)
    parser.add_argument("--lpo_candidates", type=int, default=4)
    parser.add_argument("--lpo_beta", type=float, default=500.0)
    parser.add_argument("--lpo_min_confidence", type=float, default=0.9)
    parser.add_argument("--refl_steps", type=int, default=40)
    parser.add_argument("--grpo_steps", type=int, default=20)
    parser.add_argument("--num_validation_prompts", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="toy settings: checks that everything runs")
    args = parser.parse_args(argv)
    if "refl_pixel" in args.methods and args.pixel_reward is None:
        parser.error("refl_pixel (ReFL with the pixel CNN) needs --pixel_reward, or leave it out of --methods.")
    return args


def run(command: list[str], log: Path) -> dict:
    """Run `command` to completion: its wall seconds and peak RSS (MiB), from `os.wait4` on that process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{command[1]} failed (exit {process.returncode}); see {log}")
    return {"wall_seconds": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024}


class GoldenMetric:
    """The held-out golden metric of the generator with a LoRA (or none): ReFL's and Flow-GRPO's validation."""

    def __init__(self, generator: str, prompts: list[str], seed: int):
        self.pipe = StableDiffusion3Pipeline.from_pretrained(generator)
        self.pipe.set_progress_bar_config(disable=True)
        settings = SamplingSettings(
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            max_sequence_length=TOKEN_LENGTH,
        )
        self.sampler = Sampler(self.pipe, settings)
        self.embeds, self.pooled = encode_generator_prompts(self.pipe, prompts, settings, "cpu")
        self.prompts, self.seed = prompts, seed

    @torch.no_grad()
    def __call__(self, lora_folder: Path | None) -> float:
        if lora_folder is not None:
            self.pipe.load_lora_weights(lora_folder, weight_name="pytorch_lora_weights.safetensors")
        generator = torch.Generator().manual_seed(self.seed + 12345)
        x0 = self.sampler.sample_x0(self.pipe.transformer, self.embeds, self.pooled, STEPS - 1, generator, False)
        images = tensor_to_images(decode_latents(self.pipe.vae, x0))
        if lora_folder is not None:
            self.pipe.unload_lora_weights()
        return sum(oracle_score(image, prompt) for image, prompt in zip(images, self.prompts)) / len(images)


def lpo_flags(args, out: Path, folder: Path, seed: int) -> list[str]:
    quick = args.quick
    batch = 2 if quick else 8
    return [
        "--pretrained_model_name_or_path", args.generator, "--reward_model", args.reward_model,
        "--prompts_file", str(out / "train_prompts.txt"), "--output_dir", str(folder),
        "--resolution", str(IMAGE_SIZE), "--max_sequence_length", str(TOKEN_LENGTH),
        "--num_inference_steps", str(2 if quick else STEPS), "--guidance_scale", str(GUIDANCE),
        "--sample_batch_size", str(batch), "--train_batch_size", str(batch),
        "--num_candidates", str(args.lpo_candidates),
        "--min_confidence", "0.5" if quick else str(args.lpo_min_confidence),  # toy runs keep every strict pair
        "--beta", str(args.lpo_beta), "--learning_rate", str(args.lpo_learning_rate), "--lora_rank", "8",
        "--seed", str(seed), "--max_train_steps", str(2 if quick else args.lpo_steps),
        "--checkpointing_steps", str(1 if quick else args.lpo_checkpointing_steps), "--report_to", "none",
    ]  # fmt: skip


def refl_flags(args, out: Path, folder: Path, reward: list[str]) -> list[str]:
    """`train_refl.py`'s command line of the comparison; `reward` selects the reward model."""
    quick = args.quick
    return [
        "--pretrained_model_name_or_path", args.generator, *reward, "--prompts_file", str(out / "train_prompts.txt"),
        "--validation_prompts_file", str(out / "held_out_prompts.txt"),
        "--golden_metric", f"{HERE / 'domain.py'}:oracle_score", "--height", str(IMAGE_SIZE),
        "--width", str(IMAGE_SIZE), "--max_sequence_length", str(TOKEN_LENGTH), "--guidance_scale", str(GUIDANCE),
        "--lora_rank", "8", "--learning_rate", "2e-4", "--train_batch_size", "2" if quick else "8", "--seed", "0",
        "--num_inference_steps", str(2 if quick else STEPS), "--max_train_steps", str(2 if quick else args.refl_steps),
        "--validation_steps", str(1 if quick else 10), "--num_validation_prompts", str(args.num_validation_prompts),
        "--report_to", "", "--output_dir", str(folder),
    ]  # fmt: skip


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train_all(args: argparse.Namespace, out: Path) -> dict:
    """Train the selected methods; what each run measured, and where its LoRA and curves are."""
    quick = args.quick
    steps = 2 if quick else STEPS
    refl_steps = 2 if quick else args.refl_steps
    runs = {}
    for seed in args.lpo_seeds if "lpo" in args.methods else []:
        folder = out / f"lpo-seed{seed}"
        shutil.rmtree(folder, ignore_errors=True)
        measured = run([sys.executable, str(LPO_SCRIPT), *lpo_flags(args, out, folder, seed)], out / "lpo.log")
        # max_train_steps is a multiple of checkpointing_steps, so the last checkpoint is the end of the run
        checkpoints = list(folder.glob("checkpoint-*"))
        if not checkpoints:
            raise RuntimeError(f"LPO kept no pair in {folder}: lower --lpo_min_confidence.")
        last = max(checkpoints, key=lambda path: int(path.name.split("-")[1]))
        rounds = json.loads((last / "training_state.json").read_text())["next_round"]
        batch = 2 if quick else 8
        runs[f"LPO seed {seed}"] = {
            "method": "LPO + DiNa-LRM",
            "seed": seed,
            "folder": folder,
            "optimizer_steps": int(last.name.split("-")[1]),
            "reward_model_calls": rounds * steps * args.lpo_candidates * batch,
            **measured,
        }

    refl_arms = {
        "refl": ("ReFL", "ReFL + DiNa-LRM", "refl", ["--reward_model", args.reward_model]),
        "refl_pixel": (
            "ReFL pixel CNN",
            "ReFL + pixel CNN",
            "refl-pixel",
            ["--reward", "pixel", "--pixel_reward", str(args.pixel_reward)],
        ),
    }
    for method in ("refl", "refl_pixel"):
        if method not in args.methods:
            continue
        name, label, folder_name, reward = refl_arms[method]
        folder = out / folder_name
        shutil.rmtree(folder, ignore_errors=True)
        command = [sys.executable, str(REFL_SCRIPT), *refl_flags(args, out, folder, reward)]
        runs[name] = {
            "method": label,
            "seed": 0,
            "folder": folder,
            "optimizer_steps": refl_steps,
            "reward_model_calls": refl_steps * (2 if quick else 8),
            **({"pixel_reward_sha256": sha256(args.pixel_reward)} if method == "refl_pixel" else {}),
            **run(command, out / f"{folder_name}.log"),
        }

    if "flow_grpo" not in args.methods:
        return runs
    folder = out / "flow-grpo"
    shutil.rmtree(folder, ignore_errors=True)
    grpo_steps = 1 if quick else args.grpo_steps
    sizes = ("2", "2") if quick else ("8", "4")
    flags = [
        "train", "--generator", args.generator, "--reward_model", args.reward_model, "--seed", "0",
        "--output_dir", str(folder), "--max_train_steps", str(grpo_steps), "--validation_steps", "10",
        "--num_inference_steps", str(3 if quick else STEPS), "--prompts_per_step", sizes[0], "--group_size", sizes[1],
        "--num_validation_prompts", str(args.num_validation_prompts), "--guidance_scale", str(GUIDANCE),
    ]  # fmt: skip
    if quick:
        flags += ["--sde_window_range", "2"]
    runs["Flow-GRPO"] = {
        "method": "Flow-GRPO + DiNa-LRM",
        "seed": 0,
        "folder": folder,
        "optimizer_steps": grpo_steps * 2,  # one update per SDE-window step (window 2)
        "reward_model_calls": grpo_steps * int(sizes[0]) * int(sizes[1]),
        **run([sys.executable, str(GRPO_SCRIPT), *flags], out / "flow_grpo.log"),
    }
    return runs


def kept_runs(args: argparse.Namespace) -> dict:
    """The existing results whose runs a partial `--methods` keeps ({} when every method runs)."""
    if set(args.methods) == set(METHODS):
        return {}
    if not Path(args.results).is_file():
        raise FileNotFoundError(
            f"--methods {' '.join(args.methods)} keeps the other runs from {args.results}, "
            "which does not exist: run every method (omit --methods) first."
        )
    kept = json.loads(Path(args.results).read_text())
    if kept["held_out_prompts"] != args.num_validation_prompts:
        raise ValueError(
            f"{args.results} was scored on {kept['held_out_prompts']} held-out prompts, not "
            f"--num_validation_prompts {args.num_validation_prompts}: pass the same number or run every method."
        )
    return kept


def curves(runs: dict, golden: GoldenMetric, pretrained: float) -> None:
    """Each run's (optimizer step, golden metric) points: ReFL's and Flow-GRPO's own validation, LPO's checkpoints
    scored here the same way; each step is also placed on the wall clock in proportion to the run's length."""
    for record in runs.values():
        folder = record["folder"]
        if record["method"].startswith("LPO"):
            checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
            points = [(0, pretrained)] + [(int(c.name.split("-")[1]), golden(c)) for c in checkpoints]
        elif record["method"].startswith("ReFL"):
            history = json.loads((folder / "refl_history.json").read_text())
            points = [(h["step"], h["golden_metric"]) for h in history]
        else:  # one Flow-GRPO step is two optimizer updates
            history = json.loads((folder / "flow_grpo_history.json").read_text())["validation"]
            points = [(2 * h["step"], h["golden_metric"]) for h in history]
        last = max(points[-1][0], 1)
        record["curve"] = [
            {"optimizer_steps": step, "wall_seconds": record["wall_seconds"] * step / last, "golden_metric": value}
            for step, value in points
        ]
        record["golden_metric"] = points[-1][1]
        record["folder"] = folder.name


def plot(runs: dict, pretrained: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"LPO + DiNa-LRM": "C0", "ReFL + DiNa-LRM": "C1", "Flow-GRPO + DiNa-LRM": "C2", "ReFL + pixel CNN": "C3"}
    for name, record in runs.items():
        for axis, key in zip(axes, ("optimizer_steps", "wall_seconds")):
            axis.plot(
                [p[key] for p in record["curve"]],
                [p["golden_metric"] for p in record["curve"]],
                marker="o",
                color=colours[record["method"]],
                label=name,
                alpha=0.9 if name in ("ReFL", "Flow-GRPO", "ReFL pixel CNN", "LPO seed 0") else 0.4,
            )
    for axis, label in zip(axes, ("optimizer steps", "wall seconds (run time, steps placed proportionally)")):
        axis.axhline(pretrained, color="gray", linestyle="--", label="pretrained")
        axis.set_xlabel(label)
        axis.set_ylabel("held-out oracle golden metric")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("Tiny world: aligning the generator with DiNa-LRM or the pixel CNN (one CPU thread)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(args: argparse.Namespace) -> dict:
    set_threads(1)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts, held_out = split_prompts()
    (out / "train_prompts.txt").write_text("\n".join(train_prompts))
    (out / "held_out_prompts.txt").write_text("\n".join(held_out))
    kept = kept_runs(args)
    runs = train_all(args, out)
    golden = GoldenMetric(args.generator, held_out[: args.num_validation_prompts], seed=0)
    pretrained = golden(None)
    curves(runs, golden, pretrained)
    if kept:
        if abs(kept["pretrained_golden_metric"] - pretrained) > 1e-6:
            raise ValueError(
                f"{args.results} scores the pretrained generator {kept['pretrained_golden_metric']}, this run "
                f"{pretrained}: its runs come from another generator or prompt set; run every method instead."
            )
        runs = {**{k: v for k, v in kept["runs"].items() if k not in runs}, **runs}
    lpo = [record["golden_metric"] for record in runs.values() if record["method"].startswith("LPO")]
    mean = sum(lpo) / len(lpo) if lpo else None
    stderr = (sum((x - mean) ** 2 for x in lpo) / (len(lpo) - 1) / len(lpo)) ** 0.5 if len(lpo) > 1 else None
    seeds = [record["seed"] for record in runs.values() if record["method"].startswith("LPO")]
    settings = {k: v for k, v in vars(args).items() if k not in ("output_dir", "results", "plot", "methods")}
    result = {
        "held_out_prompts": args.num_validation_prompts,
        "pretrained_golden_metric": pretrained,
        "lpo_golden_metric": {"mean": mean, "standard_error": stderr, "seeds": seeds},
        "settings": {**kept.get("settings", {}), **settings} if kept else settings,
        "runs": runs,
    }
    plot(runs, pretrained, args.plot)
    report(result, args.results)
    return result


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    main(parse_args())
