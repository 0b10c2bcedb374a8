"""Pairwise accuracy versus the scoring noise level t (the paper's Fig. 2), for one or more DiNa-LRM models.

The command line of `dinalrm.evaluation.noise_sweep` (its docstring has the usage; `--help` lists the options).
"""

import sys

from dinalrm.evaluation.noise_sweep import main


if __name__ == "__main__":
    sys.exit(main())
