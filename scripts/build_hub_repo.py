#!/usr/bin/env python
"""Assemble the DiNa-LRM Hub repository (a `DiffusionPipeline` folder) from a trained reward model and an SD3 pipeline:
the same command as `dinalrm build-hub` (the assembly is `dinalrm.hub.build_hub_folder`).

    python scripts/build_hub_repo.py --reward_model dinalrm-sd35m-reward-model \
        --base stabilityai/stable-diffusion-3.5-medium --output_dir dinalrm-sd35m \
        [--datasets MizzenAI/HPDv3] [--eval_results table1/results.json] \
        [--overwrite] [--push_to_hub --hub_model_id org/dinalrm-sd35m [--private]]
"""

import sys

from dinalrm.cli import main as dinalrm_main


def main(argv: list[str] | None = None) -> int:
    return dinalrm_main(["build-hub", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
