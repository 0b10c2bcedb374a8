#!/usr/bin/env python
"""Convert an official DiNa-LRM checkpoint (github.com/HKUST-C4G/diffusion-rm) into a `DiNaLRMModel` folder: the same
command as `dinalrm convert dinalrm` (the conversion is `dinalrm.conversion`). `DiNaLRMModel.from_pretrained` and
`DiNaLRMPipeline.from_pretrained` run it on the fly; this keeps a converted copy.

    python scripts/convert_official_checkpoint.py --official_dir liuhuohuo/DiNa-LRM-SD35M-12layers \
        --backbone stabilityai/stable-diffusion-3.5-medium --output_dir dinalrm-sd35m-reward-model [--keep_lora_adapter]
"""

import sys

from dinalrm.cli import main as dinalrm_main


def main(argv: list[str] | None = None) -> int:
    return dinalrm_main(["convert", "dinalrm", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
