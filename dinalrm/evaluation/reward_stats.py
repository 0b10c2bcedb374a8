"""Reward statistics: the distribution of a model's rewards on a reference prompt/image set, per noise setting.

Rewards of different models live on different scales; an RL trainer mixing them (`w1 * z1 + w2 * z2`) needs each
on a documented one. `reward_statistics` summarises rewards (mean, population std, quantiles, count) and
`write_reward_statistics` stores the summary in the model's `config.json` (`reward_statistics`, one entry per noise
setting; what `DiNaLRMPipeline(..., normalize="zscore")` reads) and in its model card's metadata.
`eval/reward_stats.py` scores the reference set and calls these.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def reward_statistics(
    rewards: Sequence[float], t: float | Sequence[float], quantiles: Sequence[float] = QUANTILES, **about: Any
) -> dict[str, Any]:
    """`{t, mean, std, quantiles: {"0.05": ...}, n, **about}` of `rewards` read at noise level(s) `t`.

    `std` is the population standard deviation (ddof 0), quantiles are numpy's linear interpolation; `about`
    records what the set was (e.g. `reference`, `num_noise_samples`). Needs two or more finite rewards that differ.
    """
    values = np.asarray(rewards, dtype=np.float64)
    if values.ndim != 1 or values.size < 2 or not np.isfinite(values).all():
        raise ValueError(f"Reward statistics need two or more finite rewards, got {values.size} values.")
    std = float(values.std())
    if std == 0.0:
        raise ValueError("All rewards are equal: a z-score would divide by a zero standard deviation.")
    levels = [float(t)] if isinstance(t, (int, float)) else [float(level) for level in t]
    return {
        "t": levels,
        "mean": float(values.mean()),
        "std": std,
        "quantiles": {f"{q:g}": float(np.quantile(values, q)) for q in quantiles},
        "n": int(values.size),
        **about,
    }


def _write_json(path: str, value: Mapping[str, Any]) -> None:
    """Replace `path` atomically (a staged file renamed over it)."""
    staging = tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), suffix=".json", delete=False)
    with staging:
        json.dump(value, staging, indent=2, sort_keys=True)
        staging.write("\n")
    os.replace(staging.name, path)


def merge_entry(entries: list[dict[str, Any]] | None, entry: dict[str, Any], overwrite: bool) -> list[dict[str, Any]]:
    """`entries` with `entry` added; an entry at the same levels is replaced only with `overwrite`."""
    kept = []
    for existing in entries or []:
        if np.allclose(existing["t"], entry["t"]) if len(existing["t"]) == len(entry["t"]) else False:
            if not overwrite:
                raise ValueError(
                    f"Reward statistics at t={entry['t']} exist already; pass --overwrite to replace them."
                )
            continue
        kept.append(existing)
    return [*kept, entry]


def write_reward_statistics(
    config_path: str, entry: dict[str, Any], overwrite: bool = False, card_path: str | None = None
) -> list[dict[str, Any]]:
    """Add `entry` to `reward_statistics` in the reward model's `config.json` and, when `card_path` is given, in
    that model card's metadata (the card is created if absent). Returns the config's new list."""
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["reward_statistics"] = merge_entry(config.get("reward_statistics"), entry, overwrite)
    _write_json(config_path, config)
    if card_path is not None:
        from huggingface_hub import ModelCard

        card = ModelCard.load(card_path) if os.path.isfile(card_path) else ModelCard("---\n---\n")
        card.data.reward_statistics = config["reward_statistics"]
        card.save(card_path)
    return config["reward_statistics"]
