"""Calibrated preference probabilities: fit a logistic curve to reward differences and measure it on held-out pairs.

The command line of `dinalrm.evaluation.calibration` (its docstring has the usage; `--help` lists the options).
"""

import sys

from dinalrm.evaluation.calibration import main


if __name__ == "__main__":
    sys.exit(main())
