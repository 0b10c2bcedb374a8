"""Wall time of `dinalrm SUB --help` for every subcommand, each in a fresh interpreter (what a user waits for).

    python benchmarks/bench_cli_help.py [--repeats 3]

Prints the best of `--repeats` runs per command. Measured on the 2-core development machine (shared, load ~3.5),
best of 3: every command 0.09 to 0.10 s (`dinalrm --help`, `score`, `serve`, `convert`, `convert dinalrm`,
`convert lrm`, `build-hub`, `eval`, `calibrate`); `python eval/run_eval.py --help` and `eval/calibrate.py --help`
0.15 to 0.29 s (single timed runs). Before their parsers moved to `dinalrm.evaluation.arguments`, `eval --help` took
11.8 s and `calibrate --help` 10.6 s (torch, datasets and the pipeline imported first), as `dinalrm-serve --help`
took 7.2 to 7.5 s before `dinalrm.serving.arguments`. The rule behind the figures (nothing heavy imported before the
arguments are parsed) is a test: tests/test_cli.py::test_help_imports_no_heavy_library.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


COMMANDS = [
    [],
    ["score"],
    ["serve"],
    ["convert"],
    ["convert", "dinalrm"],
    ["convert", "lrm"],
    ["build-hub"],
    ["eval"],
    ["calibrate"],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for command in COMMANDS:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run = subprocess.run(
                [sys.executable, "-m", "dinalrm.cli", *command, "--help"], capture_output=True, env=env
            )
            times.append(time.perf_counter() - start)
            if run.returncode != 0:
                raise SystemExit(run.stderr.decode())
        print(f"dinalrm {' '.join([*command, '--help']):<32} {min(times):6.2f} s")


if __name__ == "__main__":
    main()
