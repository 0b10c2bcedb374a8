"""FLOPs and memory of DiNa-LRM versus pixel-space rewards, for one reward call and one whole ReFL step.

    python eval/efficiency.py [--json PATH] [--resolution 1024]

The model of the computation is `dinalrm.evaluation.efficiency`, the printed report
`dinalrm.evaluation.efficiency_report`; this script reads the GPU measurement it is set beside and writes the figures.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from dinalrm.evaluation.efficiency import run
from dinalrm.evaluation.efficiency_report import format_report


# One ReFL step measured on a GPU by benchmarks/gpu_refl_step.py (the machine is recorded inside).
GPU_MEASUREMENT = Path(__file__).resolve().parent / "results" / "refl_step_h200.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--resolution", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument("--measurement", type=Path, default=GPU_MEASUREMENT, help="the GPU measurement (JSON)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run(json.loads(args.measurement.read_text()), args.resolution)
    result["settings"]["seconds"] = round(time.perf_counter() - start, 1)
    print(format_report(result))
    print(f"\n(measured in {result['settings']['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
