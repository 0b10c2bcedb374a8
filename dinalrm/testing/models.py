"""Tiny, real SD3 components built offline from fixed seeds: tokenizers, SD3 pipelines, DiNa-LRM models, CLIP.

Every component is a genuine diffusers/transformers class with a small config, so code exercised against
these behaves as it would against `stabilityai/stable-diffusion-3.5-medium` (same classes, same dimension
chain), without the Hub and in seconds on a CPU.
"""

from __future__ import annotations

import hashlib
import string
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from modeling_dinalrm import DiNaLRMModel
from pipeline_dinalrm import DiNaLRMPipeline


# Words of typical text-to-image prompts; every one of them is a single token in all three tokenizers.
_WORDS: tuple[str, ...] = (
    # function words
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "at",
    "with",
    "and",
    "or",
    "by",
    "to",
    "from",
    "under",
    "over",
    "near",
    "next",
    "behind",
    "front",
    "is",
    "are",
    "its",
    "his",
    "her",
    "their",
    "very",
    "no",
    "not",
    # colours
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "pink",
    "black",
    "white",
    "gray",
    "brown",
    "golden",
    "silver",
    # animals and people
    "cat",
    "cats",
    "dog",
    "dogs",
    "bird",
    "horse",
    "cow",
    "fish",
    "rabbit",
    "fox",
    "bear",
    "lion",
    "man",
    "woman",
    "child",
    "girl",
    "boy",
    "people",
    "person",
    "astronaut",
    "robot",
    # objects and places
    "table",
    "chair",
    "car",
    "bike",
    "boat",
    "house",
    "tree",
    "trees",
    "flower",
    "flowers",
    "apple",
    "cup",
    "book",
    "hat",
    "ball",
    "lamp",
    "window",
    "door",
    "street",
    "city",
    "road",
    "beach",
    "sea",
    "river",
    "lake",
    "mountain",
    "mountains",
    "forest",
    "field",
    "garden",
    "sky",
    "sun",
    "moon",
    "cloud",
    "clouds",
    "snow",
    "rain",
    "water",
    "grass",
    "room",
    "kitchen",
    "park",
    "bridge",
    "castle",
    # attributes and styles
    "big",
    "small",
    "tall",
    "old",
    "young",
    "new",
    "happy",
    "cute",
    "bright",
    "dark",
    "sunny",
    "beautiful",
    "wooden",
    "glass",
    "photo",
    "photograph",
    "picture",
    "painting",
    "drawing",
    "sketch",
    "portrait",
    "landscape",
    "close",
    "up",
    "view",
    "style",
    "art",
    "digital",
    "oil",
    "watercolor",
    "realistic",
    "detailed",
    "high",
    "quality",
    "sharp",
    "blurry",
    "sitting",
    "standing",
    "running",
    "flying",
    "eating",
    "holding",
    "wearing",
    "night",
    "day",
    "morning",
    "sunset",
)
_CLIP_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation
_T5_ALPHABET = string.ascii_letters + string.digits + string.punctuation
_Module = TypeVar("_Module", bound=torch.nn.Module)

_CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in every T5 vocabulary


def _clip(width: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int) -> dict[str, int]:
    """A CLIP text encoder's dimensions (projection as wide as the hidden states)."""
    return {"hidden_size": width, "projection_dim": width, "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers, "num_attention_heads": num_attention_heads}  # fmt: skip


# Per size: the two CLIP text encoders (deliberately different so they are told apart) and the T5 encoder;
# the T5 width is the transformer's `joint_attention_dim`.
_TEXT_ENCODER_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "clip": (_clip(16, 32, 2, 2), _clip(16, 48, 3, 4)),
        "t5": {"d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
    },
    # Fits the official-format fixture's transformer (tests/fixtures/official-tiny): pooled 64, T5 width 32.
    "official": {
        "clip": ({**_clip(16, 32, 2, 2), "projection_dim": 32}, {**_clip(16, 48, 3, 4), "projection_dim": 32}),
        "t5": {"d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
    },
    "medium": {
        "clip": (_clip(64, 256, 2, 4), _clip(128, 512, 2, 4)),
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


def _transformer_config(
    size: str,
    sample_size: int,
    num_layers: int,
    attention_head_dim: int,
    dual_attention_layers: tuple[int, ...],
    overrides: dict[str, Any],
) -> dict[str, Any]:
    """An SD3.5-style `SD3Transformer2DModel` config (4 heads, RMS qk-norm) whose text widths fit `size`."""
    inner_dim = 4 * attention_head_dim
    return {
        "sample_size": sample_size, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": num_layers,
        "attention_head_dim": attention_head_dim, "num_attention_heads": 4, "joint_attention_dim": inner_dim,
        "caption_projection_dim": inner_dim, "pooled_projection_dim": _pooled_dim(size),
        "pos_embed_max_size": sample_size, "dual_attention_layers": dual_attention_layers, "qk_norm": "rms_norm",
        **overrides,
    }  # fmt: skip


def tiny_transformer_config(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a tiny `SD3Transformer2DModel` (inner_dim 32, 4 blocks, SD3.5-style dual attention)."""
    return _transformer_config("tiny", 32, 4, 8, (0,), overrides)


def medium_transformer_config(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a medium `SD3Transformer2DModel` (inner_dim 256, 8 blocks) for CPU benchmarks."""
    return _transformer_config("medium", 64, 8, 64, (0, 1, 2), overrides)


def tiny_flux_transformer_config(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a tiny guidance-distilled `FluxTransformer2DModel` like FLUX.1-dev's (inner_dim 32, 3
    double-stream and 1 single-stream blocks, 16-channel latents packed 2x2 into 64 input channels)."""
    return {
        "patch_size": 1, "in_channels": 64, "num_layers": 3, "num_single_layers": 1, "attention_head_dim": 8,
        "num_attention_heads": 4, "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
        "axes_dims_rope": (2, 2, 4), **overrides,
    }  # fmt: skip


def tiny_zimage_transformer_config(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a tiny `ZImageTransformer2DModel` like Z-Image-Turbo's (dim 32, 3 main layers, one
    noise and one context refiner layer, 16-channel latents in 2x2 patches)."""
    return {
        "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 32, "n_layers": 3,
        "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 4, "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": 32,
        "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [2, 2, 4], "axes_lens": [256, 32, 32], **overrides,
    }  # fmt: skip


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

    `words` (default: the factory's typical prompt words) are single tokens; any other ASCII text falls back to
    characters, never to `<unk>`.
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


# Qwen3's chat template, cut to what `ZImagePipeline.encode_prompt` renders: user turns and the generation prompt
# (with thinking enabled, the generation prompt has no empty think block).
_QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def build_tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level `Qwen2Tokenizer` (Qwen3's class) built in memory: one token per byte, Qwen's special tokens
    (`<|endoftext|>` pads) and the chat template Z-Image's prompt encoding applies."""
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], chat_template=_QWEN3_CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def _module_seed(seed: int, name: str) -> int:
    """A seed per component, so adding or resizing one component leaves the weights of the others unchanged."""
    return int.from_bytes(hashlib.sha256(f"{name}/{seed}".encode()).digest()[:8], "little")


def _seeded(seed: int, name: str, build: Callable[[], _Module]) -> _Module:
    """Build a module under its own seed without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_module_seed(seed, name))
        return build().eval()


def _check_dimension_chain(transformer_config: dict[str, Any], size: str) -> None:
    """Refuse a transformer config that the `size` text encoders cannot feed (SD3's dimension chain)."""
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
    """The nine components of a `StableDiffusion3Pipeline`, small, random, float32, in eval mode.

    `size` ("tiny" or "medium") picks the text encoders and the default transformer config;
    `transformer_config` replaces the latter (it must keep the dimension chain with the text encoders).
    The T5 width follows the transformer's `joint_attention_dim`. The VAE is the same for both sizes unless
    `vae_config` replaces it. `words` and `model_max_length` go to `build_tiny_tokenizers` (the CLIP
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


def get_tiny_flux_components(seed: int = 0, transformer_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The seven components of a `FluxPipeline`, small, random, float32, in eval mode: a tiny FLUX transformer
    (`tiny_flux_transformer_config`), a 16-channel VAE with FLUX's shift/scale, CLIP whose pooled output and T5 whose
    hidden states have the transformer's widths."""
    transformer_config = transformer_config or tiny_flux_transformer_config()
    tokenizer, _, tokenizer_2 = build_tiny_tokenizers()
    bos_id, eos_id = tokenizer.convert_tokens_to_ids(list(_CLIP_SPECIAL_TOKENS))
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length, bos_token_id=bos_id,
        eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
        **_clip(transformer_config["pooled_projection_dim"], 64, 2, 2),
    )  # fmt: skip
    t5_config = T5Config(
        vocab_size=len(tokenizer_2), d_model=transformer_config["joint_attention_dim"],
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, **_TEXT_ENCODER_SIZES["tiny"]["t5"],
    )  # fmt: skip
    vae_config = {**_VAE_CONFIG, "shift_factor": 0.1159, "scaling_factor": 0.3611}
    return {
        "transformer": _seeded(seed, "flux_transformer", lambda: FluxTransformer2DModel(**transformer_config)),
        "vae": _seeded(seed, "flux_vae", lambda: AutoencoderKL(**vae_config)),
        "text_encoder": _seeded(seed, "flux_text_encoder", lambda: CLIPTextModel(clip_config)),
        "text_encoder_2": _seeded(seed, "flux_text_encoder_2", lambda: T5EncoderModel(t5_config)),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    }


def get_tiny_zimage_components(seed: int = 0, transformer_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The five components of a `ZImagePipeline`, small, random, float32, in eval mode: a tiny Z-Image transformer
    (`tiny_zimage_transformer_config`), a 16-channel VAE, a two-layer Qwen3 text encoder whose hidden states have the
    transformer's `cap_feat_dim`, and its byte-level tokenizer (`build_tiny_qwen_tokenizer`)."""
    transformer_config = transformer_config or tiny_zimage_transformer_config()
    tokenizer = build_tiny_qwen_tokenizer()
    qwen_config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=transformer_config["cap_feat_dim"], intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    vae_config = {**_VAE_CONFIG, "shift_factor": 0.1159, "scaling_factor": 0.3611}
    return {
        "transformer": _seeded(seed, "zimage_transformer", lambda: ZImageTransformer2DModel(**transformer_config)),
        "vae": _seeded(seed, "zimage_vae", lambda: AutoencoderKL(**vae_config)),
        "text_encoder": _seeded(seed, "zimage_text_encoder", lambda: Qwen3Model(qwen_config)),
        "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    }


def get_tiny_sd3_pipeline(seed: int = 0, **kwargs: Any) -> StableDiffusion3Pipeline:
    """A `StableDiffusion3Pipeline` of the factory's components; `kwargs` go to `get_tiny_sd3_components`."""
    return StableDiffusion3Pipeline(**get_tiny_sd3_components(seed=seed, **kwargs))


def save_tiny_sd3_pipeline(output_dir: str | PathLike[str], seed: int = 0, **kwargs: Any) -> str:
    """Write the tiny pipeline with `save_pretrained` so it loads like a Hub repo; returns the folder."""
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
    """A `DiNaLRMModel` on the first blocks of the factory's transformer, built through `from_backbone`.

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
    """A `DiNaLRMPipeline` of the factory's SD3 components and a tiny reward model on their transformer.

    `reward_model_kwargs` go to `get_tiny_dinalrm_reward_model`.
    """
    components = get_tiny_sd3_components(seed=seed, size=size)
    reward_model = get_tiny_dinalrm_reward_model(
        seed=seed, size=size, transformer=components.pop("transformer"), **reward_model_kwargs
    )
    pipe = DiNaLRMPipeline(reward_model=reward_model, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_dinalrm_repo(output_dir: str | PathLike[str], seed: int = 0, **kwargs: Any) -> str:
    """Write the tiny DiNa-LRM pipeline in the Hub layout, loadable offline like `org/dinalrm-sd35m`; returns it."""
    get_tiny_dinalrm_pipeline(seed=seed, **kwargs).save_pretrained(output_dir)
    return str(Path(output_dir))


@contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run torch on `num_threads` intra-op threads inside the block (tiny models run fastest on one thread)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def save_tiny_clip(output_dir: str | PathLike[str], seed: int = 0, image_size: int = 32) -> str:
    """A tiny random `CLIPModel` and its `CLIPProcessor` (the factory's offline tokenizer), saved to a folder.

    Loads with `CLIPModel.from_pretrained` and `AutoProcessor.from_pretrained` like a Hub CLIP. Returns it.
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
