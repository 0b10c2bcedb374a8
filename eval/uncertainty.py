"""How much DiNa-LRM's verdicts depend on the scoring noise (the paper's Table 4 quantities).

The command line of `dinalrm.evaluation.uncertainty` (its docstring has the usage; `--help` lists the options).
"""

import sys

from dinalrm.evaluation.uncertainty import main


if __name__ == "__main__":
    sys.exit(main())
