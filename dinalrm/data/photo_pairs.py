"""Preference pairs built from scikit-image's bundled photographs.

The learning test (tests/test_train_learning.py) needs real images whose preference is known without annotators: the
chosen image is a clean photo crop and the rejected one is the same crop after a visible degradation
(blur, noise, JPEG, down-up scaling, colour cast). scikit-image ships these photos inside its wheel, so
everything here works offline and is deterministic for a seed.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter


logger = logging.getLogger(__name__)

#: Natural photographs bundled with scikit-image (no download needed), with the caption used in prompts.
#: Gray photos are converted to RGB. Synthetic images (colorwheel, logo, phantom, checkerboard), the
#: already motion-blurred `clock`, the nearly featureless `cell` and the tiny `microaneurysms` are
#: left out on purpose.
PHOTO_CAPTIONS: dict[str, str] = {
    "astronaut": "an astronaut in a space suit",
    "chelsea": "a tabby cat",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on a launch pad",
    "immunohistochemistry": "a stained tissue sample under a microscope",
    "hubble_deep_field": "galaxies in the deep sky",
    "retina": "the back of a human eye",
    "motorcycle": "a motorcycle in a workshop",
    "camera": "a cameraman with a tripod",
    "coins": "old coins on a table",
    "moon": "the surface of the moon",
    "text": "handwritten equations on lined paper",
    "page": "a printed page of a book",
    "brick": "a brick wall",
    "grass": "a patch of grass",
    "gravel": "a gravel path",
}

#: Photos never used for training (the VAE and the reward model): two colour and two gray photos.
HELD_OUT: tuple[str, ...] = ("chelsea", "coffee", "camera", "coins")

#: Shorter side of every loaded photo, so that a crop covers a similar amount of scene in every photo.
MAX_SHORT_SIDE = 512


def _load_array(name: str) -> np.ndarray:
    """Read one bundled photo as a uint8 array (H, W) or (H, W, 3)."""
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def load_photos(
    names: Iterable[str] | None = None, max_short_side: int = MAX_SHORT_SIDE
) -> list[tuple[str, Image.Image]]:
    """Load the bundled photos as RGB PIL images (gray ones replicated to three channels).

    Photos whose shorter side exceeds `max_short_side` are downsized with Lanczos filtering so that
    crops of large, smooth photos (retina, hubble) still contain detail.
    """
    photos = []
    for name in PHOTO_CAPTIONS if names is None else names:
        if name not in PHOTO_CAPTIONS:
            raise ValueError(f"unknown photo {name!r}; choose from {sorted(PHOTO_CAPTIONS)}")
        array = _load_array(name)
        if array.dtype != np.uint8:
            raise TypeError(f"photo {name!r} has dtype {array.dtype}, expected uint8")
        img = Image.fromarray(array).convert("RGB")
        short = min(img.size)
        if short > max_short_side:
            scale = max_short_side / short
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
        photos.append((name, img))
    logger.debug("loaded %d photos: %s", len(photos), [n for n, _ in photos])
    return photos


def split_photos(names: Sequence[str], held_out: Sequence[str] = HELD_OUT) -> tuple[list[str], list[str]]:
    """Split photo names into (train, held_out); held-out names must be among `names`."""
    missing = set(held_out) - set(names)
    if missing:
        raise ValueError(f"held-out photos {sorted(missing)} are not among the given names")
    train = [n for n in names if n not in held_out]
    test = [n for n in names if n in held_out]
    return train, test


def random_crop(img: Image.Image, size: int, rng: np.random.Generator, max_zoom_out: float = 2.0) -> Image.Image:
    """Crop a random square and resize it to `size` x `size`.

    The square's side is drawn uniformly in [size, size * max_zoom_out] (capped by the photo), so crops
    mix native-resolution detail with slightly zoomed-out views; downsizing uses Lanczos (antialiased,
    sharp), so the clean crop stays clean.
    """
    if size > min(img.size):
        raise ValueError(f"crop size {size} exceeds the photo's shorter side {min(img.size)}")
    side = int(round(size * rng.uniform(1.0, max(1.0, max_zoom_out))))
    side = min(side, min(img.size))
    left = int(rng.integers(0, img.width - side + 1))
    top = int(rng.integers(0, img.height - side + 1))
    crop = img.crop((left, top, left + side, top + side))
    if side != size:
        crop = crop.resize((size, size), Image.Resampling.LANCZOS)
    return crop


def texture(img: Image.Image) -> float:
    """Mean absolute Laplacian of the gray image (0-255 scale): how much fine detail a crop holds."""
    gray = np.asarray(img.convert("L"), dtype=np.float32)
    lap = 4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:]
    return float(np.abs(lap).mean())


def _to_uint8(array: np.ndarray) -> Image.Image:
    """Round and clip a float HxWx3 array to an RGB image."""
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="RGB")


def blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur with radius (sigma, pixels) in [1.0, 2.0]."""
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.0, 2.0))))


def noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Additive Gaussian noise, std in [10, 25] on the 0-255 scale, independent per pixel and channel."""
    array = np.asarray(img, dtype=np.float32)
    std = rng.uniform(10.0, 25.0)
    return _to_uint8(array + rng.normal(0.0, std, size=array.shape))


def jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """JPEG round trip at quality 3-12 (blocking, ringing and chroma bleeding)."""
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=int(rng.integers(3, 13)))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def downscale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Down-up scaling by a factor in [2.5, 4]; upsampled with nearest (pixelated) or bilinear (soft)."""
    factor = rng.uniform(2.5, 4.0)
    small = img.resize(
        (max(1, round(img.width / factor)), max(1, round(img.height / factor))), Image.Resampling.BILINEAR
    )
    up = Image.Resampling.NEAREST if rng.random() < 0.5 else Image.Resampling.BILINEAR
    return small.resize(img.size, up)


def colour_shift(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Colour cast: hue rotation by 25-60 degrees, saturation x0.4-0.7 or x1.5-2, zero-mean channel gains.

    The channel gains (spread 0.15-0.3) also tint gray photos, where hue and saturation do nothing.
    """
    hsv = np.asarray(img.convert("HSV"), dtype=np.float32)
    hue_shift = rng.uniform(25.0, 60.0) / 360.0 * rng.choice([-1.0, 1.0])
    saturation = rng.uniform(0.4, 0.7) if rng.random() < 0.5 else rng.uniform(1.5, 2.0)
    hsv[..., 0] = (hsv[..., 0] + hue_shift * 255.0) % 256.0
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
    rgb = np.asarray(Image.fromarray(np.rint(hsv).astype(np.uint8), mode="HSV").convert("RGB"), dtype=np.float32)
    direction = rng.normal(size=3)
    direction -= direction.mean()
    direction /= np.linalg.norm(direction) + 1e-8
    gains = 1.0 + rng.uniform(0.15, 0.3) * direction
    return _to_uint8(rgb * gains)


#: Degradation name -> function(img, rng) returning a new RGB image of the same size.
DEGRADATIONS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "blur": blur,
    "noise": noise,
    "jpeg": jpeg,
    "downscale": downscale,
    "colour_shift": colour_shift,
}


def caption(name: str) -> str:
    """Short prompt for a photo, e.g. "a photo of a tabby cat"."""
    return f"a photo of {PHOTO_CAPTIONS.get(name, name)}"


def textured_crop(
    img: Image.Image, size: int, rng: np.random.Generator, min_texture: float = 4.0, tries: int = 20
) -> Image.Image:
    """Random crop with at least `min_texture` fine detail (see `texture`), so a degradation is visible.

    Falls back to the most textured of `tries` crops when none reaches the bound (e.g. mostly black sky).
    """
    best, best_texture = None, -1.0
    for _ in range(tries):
        crop = random_crop(img, size, rng)
        value = texture(crop)
        if value >= min_texture:
            return crop
        if value > best_texture:
            best, best_texture = crop, value
    return best


def make_pairs(
    photos: Sequence[tuple[str, Image.Image]],
    n_pairs: int,
    size: int = 64,
    seed: int = 0,
    kinds: Sequence[str] | None = None,
) -> list[dict]:
    """Build `n_pairs` preference pairs: chosen = clean textured crop, rejected = the same crop degraded.

    Kinds cycle in the given order (balanced counts); photos are drawn uniformly at random. Returns dicts
    `{prompt, chosen, rejected, kind, photo}`; the same arguments always give the same pairs.
    """
    kinds = list(DEGRADATIONS) if kinds is None else list(kinds)
    unknown = set(kinds) - set(DEGRADATIONS)
    if unknown:
        raise ValueError(f"unknown degradations {sorted(unknown)}; choose from {sorted(DEGRADATIONS)}")
    if not photos or not kinds:
        raise ValueError("make_pairs needs at least one photo and one degradation kind")
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n_pairs):
        name, img = photos[int(rng.integers(len(photos)))]
        kind = kinds[i % len(kinds)]
        chosen = textured_crop(img, size, rng)
        rejected = DEGRADATIONS[kind](chosen, rng)
        pairs.append({"prompt": caption(name), "chosen": chosen, "rejected": rejected, "kind": kind, "photo": name})
    logger.debug("made %d pairs (size %d, seed %d, kinds %s)", n_pairs, size, seed, kinds)
    return pairs


#: The tiny VAEs' layout (the photo test fixture tests/fixtures/tiny-photo-vae and the tiny world): SD3's at toy
#: width: three blocks (factor 4), one resnet per block, 16 latent channels.
TINY_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 8,
    "sample_size": 64,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Stack RGB images into a float tensor (B, 3, H, W) in [-1, 1], the VAE's input range."""
    array = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).div(127.5).sub(1.0)
