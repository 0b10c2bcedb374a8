"""Collect the metrics every tiny-world stage wrote under one output folder into `results.json`.

python examples/tiny_world/summarize.py --out outputs/tiny-world --output examples/tiny_world/results.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def run_eval_metrics(folder: Path) -> dict | None:
    """`eval/run_eval.py`'s results.json and `eval/noise_sweep.py`'s accuracy per noise sharing and t, if they ran."""
    results = read(folder / "results.json")
    if results is None:
        return None
    summary = {"results": results}
    if (folder / "noise_sweep.csv").exists():
        with (folder / "noise_sweep.csv").open() as handle:
            summary["noise_sweep"] = {
                f"noise={row['noise_sharing']} t={row['t']}": float(row["accuracy"]) for row in csv.DictReader(handle)
            }
    return summary


def summarize(out: Path) -> dict:
    timings = {}
    if (out / "timings.txt").exists():
        for line in (out / "timings.txt").read_text().splitlines():
            name, *fields = line.split()
            timings[name] = {k: int(v) for k, v in (f.split("=") for f in fields)}
    return {
        "vae": read(out / "vae" / "metrics.json"),
        "generator": read(out / "tiny-sd3.metrics.json"),
        "pairs": read(out / "pairs" / "stats.json"),
        "dinalrm": read(out / "metrics" / "dinalrm.json"),
        "dinalrm_run_eval": run_eval_metrics(out / "metrics" / "run_eval"),
        "pixel_baseline": read(out / "metrics" / "pixel_baseline.json"),
        "refl": read(out / "refl" / "refl_history.json"),
        "refl_fast": read(out / "refl-fast" / "refl_history.json"),
        "timings": timings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    results = summarize(Path(args.out))
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
