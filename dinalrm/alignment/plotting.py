"""Validation curves of an alignment run (ReFL, Flow-GRPO): proxy reward and golden metric against the step."""

from __future__ import annotations


def plot_curves(history: list[dict], path: str, xlabel: str = "ReFL step") -> None:
    """Proxy reward and golden metric (validation) against the step, one panel each; written as an image to `path`.

    `history` holds one record per validation with `step`, `proxy_reward` and optionally `golden_metric`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    keys = [k for k in ("proxy_reward", "golden_metric") if k in history[0]]
    figure, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for axis, key in zip(axes[0], keys):
        axis.plot(steps, [h[key] for h in history], marker="o")
        axis.set_xlabel(xlabel)
        axis.set_title(key.replace("_", " "))
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
