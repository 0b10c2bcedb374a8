"""Pairwise accuracy of pairs scored one by one with `pipe.compare`, the noise shared by the two images or not.

The command line of `dinalrm.evaluation.noise_sharing` (its docstring has the usage; `--help` lists the options).
"""

import sys

from dinalrm.evaluation.noise_sharing import main


if __name__ == "__main__":
    sys.exit(main())
