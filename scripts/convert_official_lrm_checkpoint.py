#!/usr/bin/env python
"""Convert an official LRM checkpoint (github.com/Kwai-Kolors/LPO, `lrm/`) into an `LRMPipeline` folder: the same
command as `dinalrm convert lrm` (the conversion is `dinalrm.conversion`).

    python scripts/convert_official_lrm_checkpoint.py --official_dir DIR_OR_ID \
        --base sd-legacy/stable-diffusion-v1-5 --output_dir lrm-sd15
"""

import sys

from dinalrm.cli import main as dinalrm_main
from dinalrm.conversion import convert_official_lrm_checkpoint as convert  # noqa: F401  (the name recipes import)


def main(argv: list[str] | None = None) -> int:
    return dinalrm_main(["convert", "lrm", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
