"""Pairwise accuracy of a reward model on the paper's benchmarks (Table 1), with one protocol for every model.

The command line of `dinalrm.evaluation.runner` (its docstring has the usage; `--help` lists the options, parsed
before the runner and its model stack are imported, so that `--help` is instant).
"""

import sys

from dinalrm.evaluation.arguments import parse_eval_args


def main() -> int:
    args = parse_eval_args()
    from dinalrm.evaluation.runner import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
