"""A simulated Hugging Face cache, built offline: repositories stored in the cache's documented layout
(`models--owner--name/snapshots/<commit>/...` and `refs/main`), so code that loads Hub ids can be exercised with
`HF_HUB_CACHE=<root>` and `HF_HUB_OFFLINE=1` exactly as it runs after a real download."""

from __future__ import annotations

import hashlib
import json
import shutil
from os import PathLike
from pathlib import Path

from .models import get_tiny_sd3_components


def add_to_hub_cache(cache_root: str | PathLike[str], repo_id: str, folder: str | PathLike[str]) -> Path:
    """Stores the files of `folder` as the `main` revision of model `repo_id` in the cache at `cache_root`.

    The commit is a hash of the files, so the same content gets the same revision. Returns the snapshot folder.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha1()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    commit = digest.hexdigest()
    repo = Path(cache_root) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def save_tiny_sd3_base(output_dir: str | PathLike[str], transformer_dir: str | PathLike[str], seed: int = 0) -> str:
    """A tiny SD3 pipeline folder around the transformer in `transformer_dir` (e.g. the official-format fixture's),
    with text encoders whose widths fit it; the stand-in for `stabilityai/stable-diffusion-3.5-medium`."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    config = json.loads((Path(transformer_dir) / "config.json").read_text())
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    size = "official" if config["pooled_projection_dim"] == 64 else "tiny"
    components = get_tiny_sd3_components(seed=seed, transformer_config=config, size=size)
    components["transformer"] = SD3Transformer2DModel.from_pretrained(transformer_dir)
    StableDiffusion3Pipeline(**components).save_pretrained(output_dir)
    return str(output_dir)
