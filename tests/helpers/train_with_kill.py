#!/usr/bin/env python
"""Run `train_dinalrm.py` and SIGKILL it at a chosen checkpoint, to test resuming after a crash.

    python tests/helpers/train_with_kill.py <step>[:partial] <train_dinalrm.py flags>

`<step>` kills the process right after `checkpoint-<step>` is renamed into place (a complete checkpoint);
`<step>:partial` kills it after that checkpoint's files are written but before the rename, leaving only its
`.partial-checkpoint-<step>` folder. The hook lives here, in the tests, by wrapping the one function of
`dinalrm.training.checkpointing` that makes a checkpoint visible, so the shipped trainer carries no test code.
"""

import os
import signal
import sys

import train_dinalrm  # the tests run this file with PYTHONPATH set to the repository root
from dinalrm.training import checkpointing


def install_kill(spec: str) -> None:
    """Wrap `checkpointing._publish_checkpoint` to SIGKILL this process at the checkpoint `spec` names."""
    step, _, stage = spec.partition(":")
    if stage not in ("", "partial"):
        raise SystemExit(f"kill spec {spec!r}: expected <step> or <step>:partial")
    publish = checkpointing._publish_checkpoint

    def publish_then_maybe_kill(partial: str, final: str) -> None:
        matches = os.path.basename(final) == f"{checkpointing.CHECKPOINT_PREFIX}{int(step)}"
        if matches and stage == "partial":
            os.kill(os.getpid(), signal.SIGKILL)
        publish(partial, final)
        if matches and not stage:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpointing._publish_checkpoint = publish_then_maybe_kill


if __name__ == "__main__":
    install_kill(sys.argv.pop(1))
    train_dinalrm.main(train_dinalrm.parse_args())
