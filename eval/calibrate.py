"""Calibrated preference probabilities: fit a logistic curve to reward differences and measure it on held-out pairs.

The command line of `dinalrm.evaluation.calibration` (its docstring has the usage; `--help` lists the options,
parsed before the calibration and its model stack are imported, so that `--help` is instant).
"""

import sys

from dinalrm.evaluation.arguments import parse_calibrate_args


def main() -> int:
    args = parse_calibrate_args()
    from dinalrm.evaluation.calibration import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
