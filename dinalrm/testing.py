"""Tiny, real SD3 components built offline from fixed seeds, shared by tests, benchmarks and examples.

Every component is a genuine diffusers/transformers class with a small config, so code exercised against
these behaves as it would against ``stabilityai/stable-diffusion-3.5-medium`` (same classes, same dimension
chain), without the Hub and in seconds on a CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import string
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from modeling_dinalrm import DiNaLRMModel
from pipeline_dinalrm import DiNaLRMPipeline

# Words of typical text-to-image prompts; every one of them is a single token in all three tokenizers.
_WORDS: tuple[str, ...] = (
    # function words
    "a", "an", "the", "of", "on", "in", "at", "with", "and", "or", "by", "to", "from", "under", "over",
    "near", "next", "behind", "front", "is", "are", "its", "his", "her", "their", "very", "no", "not",
    # colours
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "black", "white", "gray", "brown",
    "golden", "silver",
    # animals and people
    "cat", "cats", "dog", "dogs", "bird", "horse", "cow", "fish", "rabbit", "fox", "bear", "lion",
    "man", "woman", "child", "girl", "boy", "people", "person", "astronaut", "robot",
    # objects and places
    "table", "chair", "car", "bike", "boat", "house", "tree", "trees", "flower", "flowers", "apple",
    "cup", "book", "hat", "ball", "lamp", "window", "door", "street", "city", "road", "beach", "sea",
    "river", "lake", "mountain", "mountains", "forest", "field", "garden", "sky", "sun", "moon", "cloud",
    "clouds", "snow", "rain", "water", "grass", "room", "kitchen", "park", "bridge", "castle",
    # attributes and styles
    "big", "small", "tall", "old", "young", "new", "happy", "cute", "bright", "dark", "sunny",
    "beautiful", "wooden", "glass", "photo", "photograph", "picture", "painting", "drawing", "sketch",
    "portrait", "landscape", "close", "up", "view", "style", "art", "digital", "oil", "watercolor",
    "realistic", "detailed", "high", "quality", "sharp", "blurry", "sitting", "standing", "running",
    "flying", "eating", "holding", "wearing", "night", "day", "morning", "sunset",
)
_CLIP_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation
_T5_ALPHABET = string.ascii_letters + string.digits + string.punctuation
_Module = TypeVar("_Module", bound=torch.nn.Module)

_CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in every T5 vocabulary

# Per size: the two CLIP text encoders (deliberately different so they are told apart) and the T5 encoder;
# the T5 width is the transformer's ``joint_attention_dim``.
_TEXT_ENCODER_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "clip": (
            {"hidden_size": 16, "projection_dim": 16, "intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2},
            {"hidden_size": 16, "projection_dim": 16, "intermediate_size": 48, "num_hidden_layers": 3,
             "num_attention_heads": 4},
        ),
        "t5": {"d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
    },
    "medium": {
        "clip": (
            {"hidden_size": 64, "projection_dim": 64, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4},
            {"hidden_size": 128, "projection_dim": 128, "intermediate_size": 512, "num_hidden_layers": 2,
             "num_attention_heads": 4},
        ),
        "t5": {"d_kv": 64, "d_ff": 512, "num_layers": 2, "num_heads": 4},
    },
}

# SD3-like VAE: 16 latent channels, SD3's shift/scale, three blocks (spatial factor 4: 64x64 -> 16x16).
_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (8, 16, 16),
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": 64,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.0609,
    "scaling_factor": 1.5305,
}


def _pooled_dim(size: str) -> int:
    """SD3's pooled prompt embedding is the two CLIP projections side by side."""
    return sum(clip["projection_dim"] for clip in _TEXT_ENCODER_SIZES[size]["clip"])


def tiny_transformer_config(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a tiny ``SD3Transformer2DModel`` (inner_dim 32, 4 blocks, SD3.5-style dual attention)."""
    config = {
        "sample_size": 32,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 4,
        "attention_head_dim": 8,
        "num_attention_heads": 4,
        "joint_attention_dim": 32,
        "caption_projection_dim": 32,
        "pooled_projection_dim": _pooled_dim("tiny"),
        "pos_embed_max_size": 32,
        "dual_attention_layers": (0,),
        "qk_norm": "rms_norm",
    }
    config.update(overrides)
    return config


def medium_transformer_config(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a medium ``SD3Transformer2DModel`` (inner_dim 256, 8 blocks) for CPU benchmarks."""
    config = {
        "sample_size": 64,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 8,
        "attention_head_dim": 64,
        "num_attention_heads": 4,
        "joint_attention_dim": 256,
        "caption_projection_dim": 256,
        "pooled_projection_dim": _pooled_dim("medium"),
        "pos_embed_max_size": 64,
        "dual_attention_layers": (0, 1, 2),
        "qk_norm": "rms_norm",
    }
    config.update(overrides)
    return config


def _clip_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """BPE merges that turn every word into one token.

    Each word is run through the merges collected so far, exactly as BPE does (lowest rank first, leftmost on
    ties); whenever no merge applies, a new lowest-priority merge joins the first two pieces. Appended merges
    never change how earlier words tokenize, because those always had a better-ranked merge available.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            candidates = [(ranks[pair], i) for i, pair in enumerate(zip(pieces, pieces[1:])) if pair in ranks]
            if candidates:
                _, i = min(candidates)
            else:
                i = 0
                ranks[(pieces[0], pieces[1])] = len(merges)
                merges.append((pieces[0], pieces[1]))
            pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return merges


def build_tiny_tokenizers(
    model_max_length: int = 77, words: tuple[str, ...] = _WORDS
) -> tuple[CLIPTokenizer, CLIPTokenizer, T5Tokenizer]:
    """Two CLIP tokenizers and a T5 tokenizer built in memory from a small vocabulary (no download).

    ``words`` (default: the factory's typical prompt words) are single tokens; any other ASCII text falls back to
    characters, never to ``<unk>``.
    """
    words = tuple(dict.fromkeys(words))
    merges = _clip_merges(words)
    clip_vocab = {token: i for i, token in enumerate(_CLIP_SPECIAL_TOKENS)}
    for token in [*_CLIP_ALPHABET, *(c + "</w>" for c in _CLIP_ALPHABET), *(a + b for a, b in merges)]:
        clip_vocab.setdefault(token, len(clip_vocab))
    clip_1, clip_2 = (
        CLIPTokenizer(vocab=clip_vocab, merges=merges, model_max_length=model_max_length) for _ in range(2)
    )

    # Unigram scores: a whole word beats any split of it, so prompt words come out as single pieces.
    t5_vocab = [(token, 0.0) for token in _T5_SPECIAL_TOKENS]
    t5_vocab += [("▁" + word, -3.0) for word in words]
    t5_vocab += [("▁" + c, -4.0) for c in _T5_ALPHABET if c not in words]
    t5_vocab += [(c, -5.0) for c in _T5_ALPHABET]
    t5_vocab.append(("▁", -6.0))
    t5_tokenizer = T5Tokenizer(vocab=t5_vocab, extra_ids=0, model_max_length=model_max_length)
    return clip_1, clip_2, t5_tokenizer


def _module_seed(seed: int, name: str) -> int:
    """A seed per component, so adding or resizing one component leaves the weights of the others unchanged."""
    return int.from_bytes(hashlib.sha256(f"{name}/{seed}".encode()).digest()[:8], "little")


def _seeded(seed: int, name: str, build: Callable[[], _Module]) -> _Module:
    """Build a module under its own seed without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_module_seed(seed, name))
        return build().eval()


def _check_dimension_chain(transformer_config: dict[str, Any], size: str) -> None:
    """Refuse a transformer config that the ``size`` text encoders cannot feed (SD3's dimension chain)."""
    pooled = _pooled_dim(size)
    clip_width = sum(clip["hidden_size"] for clip in _TEXT_ENCODER_SIZES[size]["clip"])
    inner_dim = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    if transformer_config["pooled_projection_dim"] != pooled:
        raise ValueError(
            f"pooled_projection_dim must be {pooled} (the sum of the {size} CLIP projection dims), "
            f"got {transformer_config['pooled_projection_dim']}; pick size={size!r}'s transformer config."
        )
    if transformer_config["joint_attention_dim"] < clip_width:
        raise ValueError(
            f"joint_attention_dim (the T5 width) must be >= {clip_width} (the summed {size} CLIP hidden sizes), "
            f"got {transformer_config['joint_attention_dim']}."
        )
    if transformer_config["caption_projection_dim"] != inner_dim:
        raise ValueError(
            f"caption_projection_dim must equal inner_dim = num_attention_heads * attention_head_dim = {inner_dim}, "
            f"got {transformer_config['caption_projection_dim']}."
        )


def get_tiny_sd3_components(
    seed: int = 0,
    transformer_config: dict[str, Any] | None = None,
    size: str = "tiny",
    words: tuple[str, ...] = _WORDS,
    model_max_length: int = 77,
    vae_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The nine components of a ``StableDiffusion3Pipeline``, small, random, float32, in eval mode.

    ``size`` ("tiny" or "medium") picks the text encoders and the default transformer config;
    ``transformer_config`` replaces the latter (it must keep the dimension chain with the text encoders).
    The T5 width follows the transformer's ``joint_attention_dim``. The VAE is the same for both sizes unless
    ``vae_config`` replaces it. ``words`` and ``model_max_length`` go to ``build_tiny_tokenizers`` (the CLIP
    encoders' position table follows the latter).
    """
    if size not in _TEXT_ENCODER_SIZES:
        raise ValueError(f"size must be one of {sorted(_TEXT_ENCODER_SIZES)}, got {size!r}.")
    if transformer_config is None:
        transformer_config = tiny_transformer_config() if size == "tiny" else medium_transformer_config()
    _check_dimension_chain(transformer_config, size)
    encoder_sizes = _TEXT_ENCODER_SIZES[size]

    tokenizer, tokenizer_2, tokenizer_3 = build_tiny_tokenizers(model_max_length, words)
    bos_id, eos_id = tokenizer.convert_tokens_to_ids(list(_CLIP_SPECIAL_TOKENS))
    clip_configs = [
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="gelu",
            **dims,
        )
        for dims in encoder_sizes["clip"]
    ]
    t5_config = T5Config(
        vocab_size=len(tokenizer_3),
        d_model=transformer_config["joint_attention_dim"],
        pad_token_id=tokenizer_3.pad_token_id,
        eos_token_id=tokenizer_3.eos_token_id,
        decoder_start_token_id=tokenizer_3.pad_token_id,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        **encoder_sizes["t5"],
    )
    return {
        "transformer": _seeded(seed, "transformer", lambda: SD3Transformer2DModel(**transformer_config)),
        "vae": _seeded(seed, "vae", lambda: AutoencoderKL(**(vae_config or _VAE_CONFIG))),
        "text_encoder": _seeded(seed, "text_encoder", lambda: CLIPTextModelWithProjection(clip_configs[0])),
        "text_encoder_2": _seeded(seed, "text_encoder_2", lambda: CLIPTextModelWithProjection(clip_configs[1])),
        "text_encoder_3": _seeded(seed, "text_encoder_3", lambda: T5EncoderModel(t5_config)),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "tokenizer_3": tokenizer_3,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    }


def get_tiny_sd3_pipeline(seed: int = 0, **kwargs: Any) -> StableDiffusion3Pipeline:
    """A ``StableDiffusion3Pipeline`` of the factory's components; ``kwargs`` go to ``get_tiny_sd3_components``."""
    return StableDiffusion3Pipeline(**get_tiny_sd3_components(seed=seed, **kwargs))


def save_tiny_sd3_pipeline(output_dir: str | PathLike[str], seed: int = 0, **kwargs: Any) -> str:
    """Write the tiny pipeline with ``save_pretrained`` so it loads like a Hub repo; returns the folder."""
    get_tiny_sd3_pipeline(seed=seed, **kwargs).save_pretrained(output_dir)
    return str(Path(output_dir))


def get_tiny_dinalrm_reward_model(
    seed: int = 0,
    size: str = "tiny",
    num_layers: int = 2,
    visual_layers: tuple[int, ...] = (1, 2),
    text_layers: tuple[int, ...] = (1, 2),
    head_num_heads: int = 2,
    lora_rank: int = 0,
    transformer: SD3Transformer2DModel | None = None,
    head_noise_std: float = 0.1,
    **config_kwargs: Any,
) -> DiNaLRMModel:
    """A ``DiNaLRMModel`` on the first blocks of the factory's transformer, built through ``from_backbone``.

    The head gets seeded random perturbations on top of its init: some of its layers start at zero by design,
    which would give every sample the same reward and hide mistakes in tests.
    """
    if transformer is None:
        transformer = get_tiny_sd3_components(seed=seed, size=size)["transformer"]
    with tempfile.TemporaryDirectory() as backbone_dir, torch.random.fork_rng(devices=[]):
        transformer.save_pretrained(backbone_dir)
        torch.manual_seed(_module_seed(seed, "reward_model"))
        model = DiNaLRMModel.from_backbone(
            backbone_dir,
            num_layers=num_layers,
            visual_layers=visual_layers,
            text_layers=text_layers,
            head_num_heads=head_num_heads,
            lora_rank=lora_rank,
            **config_kwargs,
        )
    generator = torch.Generator().manual_seed(_module_seed(seed, "reward_head"))
    with torch.no_grad():
        for param in model.reward_head.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * head_noise_std)
    return model.eval()


def get_tiny_dinalrm_pipeline(seed: int = 0, size: str = "tiny", **reward_model_kwargs: Any) -> DiNaLRMPipeline:
    """A ``DiNaLRMPipeline`` of the factory's SD3 components and a tiny reward model on their transformer.

    ``reward_model_kwargs`` go to ``get_tiny_dinalrm_reward_model``.
    """
    components = get_tiny_sd3_components(seed=seed, size=size)
    reward_model = get_tiny_dinalrm_reward_model(
        seed=seed, size=size, transformer=components.pop("transformer"), **reward_model_kwargs
    )
    pipe = DiNaLRMPipeline(reward_model=reward_model, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_dinalrm_repo(output_dir: str | PathLike[str], seed: int = 0, **kwargs: Any) -> str:
    """Write the tiny DiNa-LRM pipeline in the Hub layout, loadable offline like ``org/dinalrm-sd35m``; returns it."""
    get_tiny_dinalrm_pipeline(seed=seed, **kwargs).save_pretrained(output_dir)
    return str(Path(output_dir))


# --------------------------------------------------------------------------------------------------- preference data
_PAIR_PROMPTS: tuple[str, ...] = (
    "a photo of a red apple on a table",
    "a cute dog in a park",
    "a castle on a mountain at sunset",
    "a watercolor painting of a boat on the sea",
    "a robot holding a cup",
    "a cat sitting in a garden",
)
PREFERENCE_FORMATS: tuple[str, ...] = ("canonical", "hpdv3", "pickapic")


def _encode_image(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def make_tiny_image_pair(rng: np.random.Generator, size: tuple[int, int] = (32, 32)) -> tuple[Image.Image, Image.Image]:
    """A smooth random picture (the preferred image) and the same picture with strong pixel noise (the other one)."""
    width, height = size
    coarse = rng.uniform(0, 255, size=(max(2, height // 8), max(2, width // 8), 3)).astype(np.uint8)
    clean = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    noisy = np.asarray(clean, dtype=np.float32) + rng.normal(0.0, 40.0, size=(height, width, 3))
    return clean, Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def write_canonical_pairs(output_dir: str | PathLike[str], rows: list[dict[str, Any]], split: str = "train") -> str:
    """Write pairs ``{prompt, chosen, rejected[, weight], ...}`` as ``<split>.parquet`` with ``datasets.Image`` columns.

    Images are PIL images (stored as PNG) or ready ``{"bytes", "path"}`` records; the first row's values decide the
    column types. Extra keys become extra columns (the training data adapter ignores them). Returns the folder.
    """
    import datasets  # optional dependency (the train / eval extras); only these builders need it

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    columns: dict[str, list[Any]] = {name: [] for name in rows[0]}
    for row in rows:
        for name, value in row.items():
            columns[name].append({"bytes": _encode_image(value), "path": None} if isinstance(value, Image.Image) else value)
    features = datasets.Features(
        {
            name: datasets.Image() if isinstance(rows[0][name], Image.Image) else datasets.Value(
                "float32" if isinstance(rows[0][name], float) else "string"
            )
            for name in columns
        }
    )
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(Path(output_dir) / f"{split}.parquet"))
    return str(output_dir)


def write_tiny_preference_dataset(
    output_dir: str | PathLike[str],
    data_format: str = "canonical",
    num_pairs: int = 8,
    size: tuple[int, int] = (32, 32),
    seed: int = 0,
    split: str = "train",
    bad_rows: bool = True,
) -> str:
    """A tiny preference dataset on disk in one of the real schemas the trainer reads; returns its folder.

    ``canonical``: ``<split>.parquet`` with ``prompt``, ``chosen`` / ``rejected`` (``datasets.Image``) and ``weight``.
    ``hpdv3``: ``<split>.json`` (``prompt, path1, path2, model1, model2, choice_dist, confidence``; ``path1`` is the
    preferred image) with PNG files under ``images/``. ``pickapic``: ``<split>.parquet`` with ``caption``, JPEG
    bytes ``jpg_0`` / ``jpg_1``, ``label_0`` / ``label_1`` (the preferred side alternates). With ``bad_rows``, one
    more row has a corrupt image (HPDv3: a missing file) and Pick-a-Pic also gets a tie: rows a trainer must skip.
    """
    import datasets  # optional dependency (the train / eval extras); only these builders need it

    if data_format not in PREFERENCE_FORMATS:
        raise ValueError(f"data_format must be one of {PREFERENCE_FORMATS}, got {data_format!r}.")
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pairs = [(_PAIR_PROMPTS[i % len(_PAIR_PROMPTS)], *make_tiny_image_pair(rng, size)) for i in range(num_pairs)]
    corrupt = _encode_image(pairs[0][1])[:40]
    if data_format == "canonical":
        rows = [{"prompt": p, "chosen": c, "rejected": r, "weight": 1.0} for p, c, r in pairs]
        if bad_rows:
            rows.append({**rows[0], "chosen": {"bytes": corrupt, "path": None}})
        return write_canonical_pairs(root, rows, split)
    if data_format == "hpdv3":
        (root / "images").mkdir(exist_ok=True)
        records = []
        for i, (prompt, chosen, rejected) in enumerate(pairs):
            paths = [f"images/{split}-{i:04d}-{name}.png" for name in ("a", "b")]
            chosen.save(root / paths[0])
            rejected.save(root / paths[1])
            records.append({"prompt": prompt, "path1": paths[0], "path2": paths[1], "model1": "sd3", "model2": "sdxl",
                            "choice_dist": [3, 1], "confidence": 0.97})
        if bad_rows:
            records.append({**records[0], "path2": f"images/{split}-missing.png"})
        (root / f"{split}.json").write_text(json.dumps(records))
        return str(root)
    columns: dict[str, list[Any]] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": [],
                                     "model_0": [], "model_1": []}
    rows = [(prompt, chosen, rejected, i % 2 == 0) for i, (prompt, chosen, rejected) in enumerate(pairs)]
    for prompt, chosen, rejected, first in rows:
        images = (chosen, rejected) if first else (rejected, chosen)
        labels = (1.0, 0.0) if first else (0.0, 1.0)
        for key, value in zip(("caption", "jpg_0", "jpg_1", "label_0", "label_1", "model_0", "model_1"),
                              (prompt, *(_encode_image(im, "JPEG") for im in images), *labels, "sd3", "sdxl")):
            columns[key].append(value)
    if bad_rows:
        for key, value in zip(columns, (pairs[0][0], corrupt, _encode_image(pairs[0][2], "JPEG"), 1.0, 0.0, "a", "b")):
            columns[key].append(value)
        for key, value in zip(columns, (pairs[1][0], *(_encode_image(im, "JPEG") for im in pairs[1][1:]), 0.5, 0.5,
                                        "a", "b")):
            columns[key].append(value)
    datasets.Dataset.from_dict(columns).to_parquet(str(root / f"{split}.parquet"))
    return str(root)


@contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run torch on ``num_threads`` intra-op threads inside the block (tiny models run fastest on one thread)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------------- benchmarks
TINY_BENCHMARKS: tuple[str, ...] = ("imagereward", "hpdv2", "hpdv3", "genai_bench", "pickapic_v2")


def write_tiny_benchmarks(data_dir: str | PathLike[str], size: tuple[int, int] = (32, 32), seed: int = 0) -> str:
    """Tiny copies of the five evaluation benchmarks, in their published layouts, under ``data_dir/<name>/``.

    Each holds a case its protocol must handle (``dinalrm.eval_datasets`` documents the protocols):
    ``imagereward`` (``test.json``: ``id, prompt, generations, ranking``) ranks [1, 2, 2, 3] (a human tie) and
    [3, 1, 2, 4] with the last file missing, and one image is wider than ``size``; ``hpdv2`` (``test.json``:
    ``prompt, image_path, rank, raw_annotations``) ranks [1, 2, 2] (a credited tie) and [2, 1, 4, 3]; ``hpdv3``
    (``test.json``: ``prompt, path1, path2, model1, model2, choice_dist, confidence``) has three pairs, one with
    a missing ``path2``; ``genai_bench`` (``test.parquet`` with ``datasets.Image`` columns) has left, right, tie,
    both-bad and left votes; ``pickapic_v2`` (``data/test_unique-*.parquet`` and ``data/test-*.parquet``, JPEG
    bytes) has 1/0, 0/1, a 0.5/0.5 tie and a corrupt JPEG. Pictures are seeded; a preferred image is the clean
    member of a :func:`make_tiny_image_pair`. Returns ``data_dir``.
    """
    import datasets  # optional dependency (the train / eval extras); only these builders need it

    root = Path(data_dir)
    rng = np.random.default_rng(seed)
    width, height = size

    def picture(picture_size: tuple[int, int] = size) -> Image.Image:
        return make_tiny_image_pair(rng, picture_size)[0]

    def write_files(folder: Path, images: dict[str, Image.Image]) -> None:
        for relpath, image in images.items():
            (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
            image.save(folder / relpath)

    folder = root / "imagereward"
    records = [
        {"id": "000001-0001", "prompt": "a red apple on a table",
         "generations": [f"images/test/000001-{k}.png" for k in range(4)], "ranking": [1, 2, 2, 3]},
        {"id": "000002-0002", "prompt": "a cat sitting in a garden",
         "generations": [f"images/test/000002-{k}.png" for k in range(4)], "ranking": [3, 1, 2, 4]},
    ]  # fmt: skip
    files = {path: picture() for record in records for path in record["generations"][:3]}
    files[records[0]["generations"][3]] = picture((width + 8, height))
    write_files(folder, files)
    (folder / "test.json").write_text(json.dumps(records))

    folder = root / "hpdv2"
    records = [
        {"prompt": "a castle on a mountain", "image_path": ["00000.jpg", "00001.jpg", "00002.jpg"], "rank": [1, 2, 2],
         "raw_annotations": [[1, 2, 3], [1, 3, 2]]},
        {"prompt": "a boat on the sea", "image_path": ["00003.jpg", "00004.jpg", "00005.jpg", "00006.jpg"],
         "rank": [2, 1, 4, 3], "raw_annotations": [[2, 1, 4, 3]]},
    ]  # fmt: skip
    write_files(folder, {path: picture() for record in records for path in record["image_path"]})
    (folder / "test.json").write_text(json.dumps(records))

    folder = root / "hpdv3"
    records = []
    for i, prompt in enumerate(("a dog in a park", "a dog in a park", "a robot holding a cup")):
        chosen, rejected = make_tiny_image_pair(rng, size)
        paths = [f"images/{i}-a.png", f"images/{i}-b.png"]
        write_files(folder, {paths[0]: chosen, **({paths[1]: rejected} if i != 1 else {})})
        records.append({"prompt": prompt, "path1": paths[0], "path2": paths[1], "model1": "flux", "model2": "sd3",
                        "choice_dist": None, "confidence": None})
    (folder / "test.json").write_text(json.dumps(records))

    votes = ("leftvote", "rightvote", "tievote", "bothbad_vote", "leftvote")
    columns: dict[str, list[Any]] = {"prompt": [], "left_model": [], "left_image": [], "right_model": [],
                                     "right_image": [], "vote_type": []}
    for i, vote in enumerate(votes):
        chosen, rejected = make_tiny_image_pair(rng, size)
        left, right = (rejected, chosen) if vote == "rightvote" else (chosen, rejected)
        for key, value in zip(columns, (_PAIR_PROMPTS[i % 3], "sdxl", {"bytes": _encode_image(left), "path": None},
                                        "flux", {"bytes": _encode_image(right), "path": None}, vote)):
            columns[key].append(value)
    features = datasets.Features({name: datasets.Image() if name.endswith("_image") else datasets.Value("string")
                                  for name in columns})
    (root / "genai_bench").mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(root / "genai_bench" / "test.parquet"))

    labels = ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 0.0))
    columns = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": [], "model_0": [], "model_1": []}
    for i, (label_0, label_1) in enumerate(labels):
        chosen, rejected = (_encode_image(im, "JPEG") for im in make_tiny_image_pair(rng, size))
        first, second = (rejected, chosen) if label_1 > label_0 else (chosen, rejected)
        if i == 3:
            second = second[:40]
        for key, value in zip(columns, (_PAIR_PROMPTS[3 + i % 3], first, second, label_0, label_1, "sd3", "sdxl")):
            columns[key].append(value)
    features = datasets.Features({**{name: datasets.Value("string") for name in ("caption", "model_0", "model_1")},
                                  "jpg_0": datasets.Value("binary"), "jpg_1": datasets.Value("binary"),
                                  "label_0": datasets.Value("float64"), "label_1": datasets.Value("float64")})
    table = datasets.Dataset.from_dict(columns, features=features)
    (root / "pickapic_v2" / "data").mkdir(parents=True, exist_ok=True)
    table.to_parquet(str(root / "pickapic_v2" / "data" / "test_unique-00000-of-00001.parquet"))
    table.select([0, 1]).to_parquet(str(root / "pickapic_v2" / "data" / "test-00000-of-00001.parquet"))
    return str(root)


def save_tiny_clip(output_dir: str | PathLike[str], seed: int = 0, image_size: int = 32) -> str:
    """A tiny random ``CLIPModel`` and its ``CLIPProcessor`` (the factory's offline tokenizer), saved to a folder.

    Loads with ``CLIPModel.from_pretrained`` and ``AutoProcessor.from_pretrained`` like a Hub CLIP. Returns it.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_tiny_tokenizers()[0]
    bos_id, eos_id = tokenizer.convert_tokens_to_ids(list(_CLIP_SPECIAL_TOKENS))
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "max_position_embeddings": tokenizer.model_max_length,
                     "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": tokenizer.pad_token_id,
                     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"image_size": image_size, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16,
    )  # fmt: skip
    _seeded(seed, "clip", lambda: CLIPModel(config)).save_pretrained(output_dir)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(output_dir)
    return str(Path(output_dir))
