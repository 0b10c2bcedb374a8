"""DiNa-LRM: shared code for training, alignment, serving and evaluation (not Hub remote code).

One sub-package per concern: `dinalrm.data` (preference datasets, benchmarks, images), `dinalrm.training`,
`dinalrm.alignment` (rewards for Flow-GRPO, the SDE step, LPO, ReFL and GRPO building blocks), `dinalrm.serving`
(batch scoring, the HTTP server), `dinalrm.evaluation`; plus `dinalrm.hub`, `dinalrm.conversion` (official
checkpoints), `dinalrm.cli` (the `dinalrm` command) and `dinalrm.testing`.
"""

from importlib.resources import files
from pathlib import Path

from ._lazy import install_moved_modules


__version__ = "0.2.0"


# The published checkpoint (official layout; converted on first use and cached).
DEFAULT_MODEL = "liuhuohuo/DiNa-LRM-SD35M-12layers"
# The base it needs: gated, its licence is accepted on its Hub page (https://huggingface.co/<id>).
DEFAULT_BASE = "stabilityai/stable-diffusion-3.5-medium"

# Flat module names of release 0.1 -> their home now; importable with a FutureWarning for one release.
MOVED_MODULES = {
    "dinalrm.eval_datasets": "dinalrm.data.benchmarks",
    "dinalrm.images": "dinalrm.data.images",
    "dinalrm.photo_pairs": "dinalrm.data.photo_pairs",
    "dinalrm.buckets": "dinalrm.training.buckets",
    "dinalrm.pair_datasets": "dinalrm.training.pair_datasets",
    "dinalrm.feature_cache": "dinalrm.training.feature_cache",
    "dinalrm.checkpointing": "dinalrm.training.checkpointing",
    "dinalrm.training_utils": "dinalrm.training.utils",
    "dinalrm.lrm_training": "dinalrm.training.lrm",
    "dinalrm.rewards": "dinalrm.alignment.rewards",
    "dinalrm.flow_sde": "dinalrm.alignment.flow_sde",
    "dinalrm.lpo": "dinalrm.alignment.lpo",
    "dinalrm.batch_scoring": "dinalrm.serving.scoring",
    "dinalrm.serve": "dinalrm.serving.server",
    "dinalrm.serve_ray": "dinalrm.serving.ray_serve",
}
install_moved_modules(MOVED_MODULES)


def bundled_asset(*parts: str) -> Path:
    """A file or folder shipped with the package under `dinalrm/assets/` (the demo model `dinalrm-tiny`, the
    README's `examples/` images), found the same way in a clone and in an installed wheel."""
    return Path(str(files(__name__).joinpath("assets", *parts)))
