"""The tiny world: a procedural text-to-image domain with a pixel-only oracle.

Every image is 64x64 and shows one shape on a plain background. A prompt fixes five attributes::

    "a small red circle at the left on a white background"

The oracle reads an image with no model at all: it segments the foreground against the prompt's background
colour, counts connected components, and measures colour (mean foreground colour), shape (fill ratio of the
bounding box: square ~1, circle ~pi/4, triangle ~1/2), size (area), position (centroid) and background
(border colour). It plays the role of the paper's held-out "golden metric".
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage


IMAGE_SIZE = 64
SUPERSAMPLE = 4

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 8.0, "large": 14.0}  # half-extent in pixels
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (17.0, 32.0),
    "right": (47.0, 32.0),
    "top": (32.0, 17.0),
    "bottom": (32.0, 47.0),
    "center": (32.0, 32.0),
}
# Fill ratio of the axis-aligned bounding box for each shape (what the oracle measures).
FILL_RATIOS: dict[str, float] = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position", "background")
VOCABULARY: tuple[str, ...] = (
    "a",
    "at",
    "the",
    "on",
    "background",
    *COLORS,
    *BACKGROUNDS,
    *SHAPES,
    *SIZES,
    *POSITIONS,
)


@dataclass(frozen=True)
class Scene:
    """The five attributes a prompt specifies."""

    size: str
    color: str
    shape: str
    position: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.size} {self.color} {self.shape} at the {self.position} on a {self.background} background"

    @classmethod
    def parse(cls, prompt: str) -> Scene:
        words = prompt.split()
        if len(words) != 11 or words[0] != "a" or words[4:6] != ["at", "the"] or words[-1] != "background":
            raise ValueError(f"not a tiny-world prompt: {prompt!r}")
        scene = cls(size=words[1], color=words[2], shape=words[3], position=words[6], background=words[9])
        if (
            scene.size not in SIZES
            or scene.color not in COLORS
            or scene.shape not in SHAPES
            or scene.position not in POSITIONS
            or scene.background not in BACKGROUNDS
        ):
            raise ValueError(f"unknown attribute in prompt {prompt!r}")
        return scene


def all_scenes() -> list[Scene]:
    """Every scene of the grammar (4 colours x 3 shapes x 2 sizes x 5 positions x 3 backgrounds = 360)."""
    return [Scene(*combo) for combo in itertools.product(SIZES, COLORS, SHAPES, POSITIONS, BACKGROUNDS)]


def split_prompts(held_out_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """A fixed train / held-out split of all prompts (held-out prompts are never trained on)."""
    prompts = [scene.prompt for scene in all_scenes()]
    random.Random(seed).shuffle(prompts)
    n_held = round(held_out_fraction * len(prompts))
    return sorted(prompts[n_held:]), sorted(prompts[:n_held])


def sample_prompts(prompts: list[str], n: int, seed: int) -> list[str]:
    """`n` prompts drawn with replacement from `prompts`, reproducibly."""
    rng = random.Random(seed)
    return [rng.choice(prompts) for _ in range(n)]


def render(prompt: str | Scene, rng: np.random.Generator | None = None, jitter: float = 3.0) -> Image.Image:
    """Draw the scene at 4x resolution and downsample (anti-aliasing); `rng` adds position/size jitter."""
    scene = Scene.parse(prompt) if isinstance(prompt, str) else prompt
    rng = rng if rng is not None else np.random.default_rng(0)
    s = SUPERSAMPLE
    image = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter)
    half = SIZES[scene.size] * rng.uniform(0.9, 1.1)
    box = [(cx - half) * s, (cy - half) * s, (cx + half) * s, (cy + half) * s]
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


# ------------------------------------------------------------------------------------------------------ oracle
def _nearest(value: np.ndarray, table: dict[str, tuple]) -> str:
    return min(table, key=lambda name: float(np.sum((np.asarray(table[name], dtype=np.float64) - value) ** 2)))


def _foreground(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Pixels more than 60 (RGB distance) away from the background colour."""
    return np.linalg.norm(pixels - background, axis=-1) > 60.0


def measure(image: Image.Image, background: str) -> dict[str, float]:
    """Pixel measurements of an image against a background colour: area, centroid, fill, colour, components."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    mask = _foreground(pixels, np.asarray(BACKGROUNDS[background], dtype=np.float64))
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, range(1, n + 1)) if n else np.zeros(0)
    components = int(np.sum(sizes >= 6))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    result = {"components": components, "border": np.median(border, axis=0), "area": float(mask.sum())}
    if n == 0:
        return result
    main = labels == (int(np.argmax(sizes)) + 1)
    ys, xs = np.nonzero(main)
    box_area = float((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    result.update(
        main_area=float(main.sum()),
        cx=float(xs.mean()),
        cy=float(ys.mean()),
        fill=float(main.sum()) / box_area,
        extent=float(max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)),
        color=pixels[main].mean(axis=0),
    )
    return result


def _expected_extent(size: str) -> float:
    return 2.0 * SIZES[size]


def oracle_attributes(image: Image.Image, background: str) -> dict[str, str | None]:
    """The oracle's reading of each attribute (None when there is no foreground shape)."""
    m = measure(image, background)
    attrs: dict[str, str | None] = {"background": _nearest(m["border"], BACKGROUNDS)}
    if "cx" not in m:
        return {**attrs, "color": None, "shape": None, "size": None, "position": None}
    attrs["color"] = _nearest(m["color"], COLORS)
    attrs["shape"] = min(FILL_RATIOS, key=lambda k: abs(FILL_RATIOS[k] - m["fill"]))
    attrs["size"] = min(SIZES, key=lambda k: abs(math.log(m["extent"] / _expected_extent(k))))
    attrs["position"] = min(POSITIONS, key=lambda k: math.dist(POSITIONS[k], (m["cx"], m["cy"])))
    return attrs


def attribute_accuracy(image: Image.Image, prompt: str) -> float:
    """Fraction of the five attributes (plus 'exactly one shape') that the oracle reads as the prompt says."""
    scene = Scene.parse(prompt)
    attrs = oracle_attributes(image, scene.background)
    hits = [attrs[name] == getattr(scene, name) for name in ATTRIBUTES]
    hits.append(measure(image, scene.background)["components"] == 1)
    return float(np.mean(hits))


def oracle_score(image: Image.Image, prompt: str) -> float:
    """A smooth score in [0, 1] of how well the image's pixels match the prompt (higher is better)."""
    scene = Scene.parse(prompt)
    m = measure(image, scene.background)
    background = math.exp(-np.linalg.norm(m["border"] - BACKGROUNDS[scene.background]) / 60.0)
    count = 1.0 / (1.0 + abs(m["components"] - 1))
    if "cx" not in m:
        return background / 6.0
    target = np.asarray(COLORS[scene.color], dtype=np.float64)
    color = math.exp(-np.linalg.norm(m["color"] - target) / 80.0)
    shape = math.exp(-(((m["fill"] - FILL_RATIOS[scene.shape]) / 0.12) ** 2))
    size = math.exp(-((math.log(m["extent"] / _expected_extent(scene.size)) / 0.25) ** 2))
    tx, ty = POSITIONS[scene.position]
    position = math.exp(-((m["cx"] - tx) ** 2 + (m["cy"] - ty) ** 2) / (2 * 8.0**2))
    clean = m["main_area"] / max(m["area"], 1.0)
    return float(np.mean([background, count * clean, color, shape, size, position]))


def oracle_prefers(image_a: Image.Image, image_b: Image.Image, prompt: str, margin: float = 0.0) -> bool | None:
    """True if the oracle prefers `image_a`, False if `image_b`, None if the scores differ by at most `margin`."""
    diff = oracle_score(image_a, prompt) - oracle_score(image_b, prompt)
    if abs(diff) <= margin:
        return None
    return diff > 0
