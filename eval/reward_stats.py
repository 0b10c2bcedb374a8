"""Reward statistics of a DiNa-LRM model on a reference set, for z-scored rewards (`normalize="zscore"`).

The command line of `dinalrm.evaluation.reward_stats` (its docstring has the usage; `--help` lists the options).
"""

import sys

from dinalrm.evaluation.reward_stats import main


if __name__ == "__main__":
    sys.exit(main())
