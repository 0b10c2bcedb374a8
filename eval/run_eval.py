"""Pairwise accuracy of a reward model on the paper's benchmarks (Table 1), with one protocol for every model.

The command line of `dinalrm.evaluation.runner` (its docstring has the usage; `--help` lists the options).
"""

import sys

from dinalrm.evaluation.runner import main


if __name__ == "__main__":
    sys.exit(main())
