"""A pixel-space reward of similar size to the tiny DiNa-LRM: the baseline that alignment recipes compare against.

A small CNN reads the decoded image (plus x/y coordinate channels, so position is visible), is modulated (FiLM) by
the prompt's text-encoder features (flattened and projected) and returns one score. It is trained by
`examples/tiny_world/pixel_baseline.py` and saved with its text shape in the safetensors metadata.
"""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn


class PixelReward(nn.Module):
    """CNN over RGB + coordinates, FiLM-conditioned on the prompt embeddings, one score per image."""

    def __init__(self, text_tokens: int, text_dim: int, width: int = 64):
        super().__init__()
        self.text_dim = text_dim
        self.text = nn.Sequential(
            nn.Flatten(1), nn.Linear(text_tokens * text_dim, width), nn.GELU(), nn.Linear(width, 2 * width)
        )
        self.trunk = nn.Sequential(
            nn.Conv2d(5, 32, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(32, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
        )
        self.head = nn.Sequential(
            nn.GELU(),
            nn.Conv2d(width, 16, 1),
            nn.GELU(),
            nn.Flatten(1),
            nn.Linear(16 * 8 * 8, width),
            nn.GELU(),
            nn.Linear(width, 1),
        )

    def forward(self, pixels: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixels.shape
        ys = torch.linspace(-1, 1, h, device=pixels.device, dtype=pixels.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=pixels.device, dtype=pixels.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        features = self.trunk(torch.cat([pixels, xs, ys], dim=1))
        gamma, beta = self.text(prompt_embeds).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        return self.head(features * (1 + gamma) + beta).squeeze(-1)


def save_pixel_reward(model: PixelReward, path: str) -> None:
    """The CNN's weights with its text shape in the metadata, so `load_pixel_reward` can rebuild it."""
    tokens, dim = model.text[1].in_features // model.text_dim, model.text_dim
    save_file(model.state_dict(), path, metadata={"text_tokens": str(tokens), "text_dim": str(dim)})


def load_pixel_reward(path: str) -> PixelReward:
    """A CNN written by `--save_model`, in eval mode."""
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    model = PixelReward(int(metadata["text_tokens"]), int(metadata["text_dim"]))
    model.load_state_dict(load_file(path))
    return model.eval()
