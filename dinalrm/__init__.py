"""DiNa-LRM: shared code for training, evaluation and the command line (not Hub remote code)."""

from importlib.resources import files
from pathlib import Path


__version__ = "0.2.0"


def bundled_asset(*parts: str) -> Path:
    """A file or folder shipped with the package under `dinalrm/assets/` (the demo model `dinalrm-tiny`, the
    README's `examples/` images), found the same way in a clone and in an installed wheel."""
    return Path(str(files(__name__).joinpath("assets", *parts)))
