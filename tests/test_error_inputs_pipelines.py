"""Error inputs of the scoring pipelines (DiNa-LRM on SD3, FLUX and Z-Image, LRM) and of `score_latents`: each row
is a call that must raise the named exception with a message naming the problem; then the LRM pipeline's paired
noise (identical images give P = 0.5 exactly), and property-based fuzzing of the pipelines' input normalisation
(random shapes, dtypes, NaN / Inf, sizes): finite rewards or a ValueError / TypeError, nothing else."""

import tempfile

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FluxPipeline, ZImagePipeline
from error_inputs import ErrorInput, assert_message, rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from transformers import CLIPTokenizer

from dinalrm.testing import get_tiny_dinalrm_pipeline
from dinalrm.testing.lrm_models import get_tiny_lrm, save_tiny_sd_pipeline
from dinalrm.testing.models import get_tiny_flux_components, get_tiny_zimage_components
from modeling_dinalrm import DiNaLRMModel
from pipeline_dinalrm import DiNaLRMFluxPipeline, DiNaLRMZImagePipeline
from pipeline_lrm import LRMPipeline


pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red square"


def reward_model_on(transformer, **kwargs) -> DiNaLRMModel:
    with tempfile.TemporaryDirectory() as folder, torch.random.fork_rng(devices=[]):
        transformer.save_pretrained(folder)
        torch.manual_seed(1)
        return DiNaLRMModel.from_backbone(folder, num_layers=2, visual_layers=[1, 2], text_layers=[1, 2], **kwargs)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    flux = FluxPipeline(**get_tiny_flux_components(seed=0))
    zimage = ZImagePipeline(**get_tiny_zimage_components(seed=0))
    base = save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd15") / "base", "sd15")
    from diffusers import AutoencoderKL

    lrm = LRMPipeline(
        reward_model=get_tiny_lrm(base, "sd15").eval(),
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae"),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
    )
    pipelines = {
        "sd3": get_tiny_dinalrm_pipeline(),
        "flux": DiNaLRMFluxPipeline.from_flux(flux, reward_model_on(flux.transformer, max_sequence_length=16).eval()),
        "zimage": DiNaLRMZImagePipeline.from_zimage(
            zimage, reward_model_on(zimage.transformer, max_sequence_length=64).eval()
        ),
        "lrm": lrm,
    }
    for pipe in pipelines.values():
        pipe.set_progress_bar_config(disable=True)
    return pipelines


def channels(pipe) -> int:
    return pipe.vae.config.latent_channels


def latents(pipe, side=8, value=None, dtype=torch.float32):
    x = torch.randn(1, channels(pipe), side, side, generator=torch.Generator().manual_seed(0))
    if value is not None:
        x.view(-1)[0] = value
    return x.to(dtype)


def embeds(pipe, tokens):
    """Prompt embeddings of `tokens` tokens in the family's format (widths read from the reward model's config)."""
    rm = pipe.reward_model
    dim = rm.backbone.cap_feat_dim if rm.config.backbone == "zimage" else rm.backbone.joint_attention_dim
    prompt = torch.zeros(1, tokens, dim)
    if rm.config.backbone == "zimage":
        return {"prompt_embeds": prompt}
    return {"prompt_embeds": prompt, "pooled_prompt_embeds": torch.zeros(1, rm.backbone.pooled_projection_dim)}


def zimage_max_side(pipe) -> int:
    return pipe.reward_model.backbone.rope_embedder.axes_lens[1] * pipe.reward_model.config.latent_patch_size


def pixels(height, width, value=0.5):
    array = np.full((height, width, 3), value, dtype=np.float32)
    return array


def cases(family: str) -> list[ErrorInput]:
    """The rows every pipeline shares, for `family`."""
    return [
        ErrorInput(
            f"{family}: empty prompt", (family, lambda p: p(" ", latents=latents(p))), ValueError, "prompt is empty"
        ),
        ErrorInput(f"{family}: images=[]", (family, lambda p: p(PROMPT, images=[])), ValueError, "empty list"),
        ErrorInput(
            f"{family}: NaN latents",
            (family, lambda p: p(PROMPT, latents=latents(p, value=float("nan")))),
            ValueError,
            "NaN or infinite",
        ),
        ErrorInput(
            f"{family}: infinite latents",
            (family, lambda p: p(PROMPT, latents=latents(p, value=float("inf")))),
            ValueError,
            "NaN or infinite",
        ),
        ErrorInput(
            f"{family}: int64 latents",
            (family, lambda p: p(PROMPT, latents=latents(p, dtype=torch.int64))),
            TypeError,
            "floating-point",
        ),
        ErrorInput(
            f"{family}: 3D latents",
            (family, lambda p: p(PROMPT, latents=latents(p)[0])),
            ValueError,
            "latents must be",
        ),
        ErrorInput(
            f"{family}: 0-sample latents",
            (family, lambda p: p(PROMPT, latents=latents(p)[:0])),
            ValueError,
            "no sample|0 images|prompts for 0",
        ),
        ErrorInput(
            f"{family}: NaN pixels",
            (family, lambda p: p(PROMPT, images=pixels(32, 32, float("nan")))),
            ValueError,
            "NaN",
        ),
        ErrorInput(f"{family}: 0x64 image", (family, lambda p: p(PROMPT, images=pixels(0, 64))), ValueError, "empty"),
        ErrorInput(
            f"{family}: missing image file",
            (family, lambda p: p(PROMPT, images="/no/such/image.png")),
            FileNotFoundError,
            "no such file",
        ),
        ErrorInput(
            f"{family}: a list of dicts as images",
            (family, lambda p: p(PROMPT, images=[{"path": "x.png"}])),
            TypeError,
            "images",
        ),
    ]


PIPELINE_ERROR_INPUTS = [
    *(row for family in ("sd3", "flux", "zimage", "lrm") for row in cases(family)),
    ErrorInput(
        "sd3: latents above the maximum side",
        ("sd3", lambda p: p(PROMPT, latents=latents(p, side=p.max_latent_side + 2))),
        ValueError,
        "exceeds the backbone's maximum",
    ),
    ErrorInput("sd3: 7x7 latents", ("sd3", lambda p: p(PROMPT, latents=latents(p, side=7))), ValueError, "divisible"),
    ErrorInput(
        "sd3: 0-token prompt_embeds",
        ("sd3", lambda p: p(latents=latents(p), **embeds(p, 0))),
        ValueError,
        "0 tokens",
    ),
    ErrorInput("sd3: t = 2", ("sd3", lambda p: p(PROMPT, latents=latents(p), t=2.0)), ValueError, r"\[0, 1\]"),
    ErrorInput(
        "sd3: num_noise_samples 0",
        ("sd3", lambda p: p(PROMPT, latents=latents(p), num_noise_samples=0)),
        ValueError,
        "num_noise_samples",
    ),
    ErrorInput(
        "flux: 0-token prompt_embeds",
        ("flux", lambda p: p(latents=latents(p), **embeds(p, 0))),
        ValueError,
        "0 tokens",
    ),
    ErrorInput("flux: odd latents", ("flux", lambda p: p(PROMPT, latents=latents(p, side=7))), ValueError, "even"),
    ErrorInput(
        "zimage: 0-token prompt_embeds",
        ("zimage", lambda p: p(latents=latents(p), **embeds(p, 0))),
        ValueError,
        "0 tokens|non-empty",
    ),
    ErrorInput(
        "zimage: an empty caption in a list",
        (
            "zimage",
            lambda p: p(latents=latents(p), prompt_embeds=[torch.zeros(0, p.reward_model.backbone.cap_feat_dim)]),
        ),
        ValueError,
        "non-empty",
    ),
    ErrorInput(
        "zimage: latents above the maximum side",
        ("zimage", lambda p: p(PROMPT, latents=latents(p, side=zimage_max_side(p) + 2))),
        ValueError,
        "exceeds the backbone's maximum",
    ),
    ErrorInput(
        "zimage: caption past the rotary table",
        ("zimage", lambda p: p(latents=latents(p), **embeds(p, p.reward_model.backbone.rope_embedder.axes_lens[0]))),
        ValueError,
        "shorten the prompt",
    ),
    ErrorInput(
        "lrm: 1e30 latents",
        ("lrm", lambda p: p(PROMPT, latents=latents(p) * 1e30)),
        ValueError,
        r"samples \[0\] scored",
    ),
    ErrorInput(
        "lrm: 5 channels", ("lrm", lambda p: p(PROMPT, latents=torch.zeros(1, 5, 8, 8))), ValueError, "latents must be"
    ),
    ErrorInput(
        "lrm: timestep 1000", ("lrm", lambda p: p(PROMPT, latents=latents(p), t=1000)), ValueError, "DDPM timestep"
    ),
    ErrorInput(
        "lrm: noise_sharing 'pair'",
        ("lrm", lambda p: p(PROMPT, latents=latents(p), noise_sharing="pair")),
        ValueError,
        "noise_sharing",
    ),
    ErrorInput(
        "lrm: rank of 1e30 latents",
        ("lrm", lambda p: p.rank(PROMPT, latents=torch.cat([latents(p), latents(p) * 1e30]))),
        ValueError,
        r"samples \[1\] scored",
    ),
]


@pytest.mark.parametrize("row", rows(PIPELINE_ERROR_INPUTS))
def test_pipeline_error_inputs(row, pipes):
    family, call = row.input
    with pytest.raises(row.error) as raised:
        call(pipes[family])
    assert_message(row, str(raised.value))


SCORE_LATENTS_ERROR_INPUTS = [
    ErrorInput("NaN latents", {"latents": lambda x: x.fill_(float("nan"))}, ValueError, "NaN or infinite"),
    ErrorInput("int latents", {"latents": lambda x: x.long()}, TypeError, "floating-point"),
    ErrorInput("8 channels", {"latents": lambda x: x[:, :8]}, ValueError, "channels"),
    ErrorInput("0x0 latents", {"latents": lambda x: x[..., :0, :0]}, ValueError, "no pixel"),
    ErrorInput("0 tokens", {"prompt_embeds": lambda e: e[:, :0]}, ValueError, "0 tokens"),
    ErrorInput("wrong width", {"prompt_embeds": lambda e: e[..., :-1]}, ValueError, "prompt_embeds have dim"),
    ErrorInput("batch mismatch", {"prompt_embeds": lambda e: e.repeat(2, 1, 1)}, ValueError, "batch mismatch"),
    ErrorInput("no pooled", {"pooled_prompt_embeds": lambda p: None}, ValueError, "pooled_prompt_embeds must be"),
    ErrorInput("t = -0.1", {"t": -0.1}, ValueError, r"\[0, 1\]"),
    ErrorInput("NaN noise", {"noise": lambda x: torch.full_like(x, float("nan"))}, ValueError, "noise contains NaN"),
]


@pytest.mark.parametrize("row", rows(SCORE_LATENTS_ERROR_INPUTS))
def test_score_latents_error_inputs(row, pipes):
    model = pipes["sd3"].reward_model
    inputs = {
        "latents": latents(pipes["sd3"]),
        **embeds(pipes["sd3"], 4),
        "t": 0.4,
        "noise": None,
    }
    for name, change in row.input.items():
        inputs[name] = change(inputs["latents"] if name == "noise" else inputs[name]) if callable(change) else change
    with pytest.raises(row.error) as raised:
        model.score_latents(**inputs, check_finite=True)
    assert_message(row, str(raised.value))


# ------------------------------------------------------------------------------------------ LRM paired noise
def test_lrm_identical_images_give_p_one_half_exactly_for_every_seed(pipes):
    pipe = pipes["lrm"]
    image = PIL.Image.effect_noise((40, 32), 50).convert("RGB")
    other = PIL.Image.effect_noise((40, 32), 90).convert("RGB")
    probabilities = set()
    for seed in range(10):
        comparison = pipe.compare(PROMPT, image, image.copy(), generator=torch.Generator().manual_seed(seed))
        assert comparison.probability == 0.5  # paired noise and one scoring of the equal latents: exactly equal
        probabilities.add(
            pipe.compare(PROMPT, image, other, generator=torch.Generator().manual_seed(seed)).probability
        )
    assert len(probabilities) > 1  # the seed still changes the noise of distinct images
    unpaired = [
        pipe.compare(
            PROMPT, image, image, generator=torch.Generator().manual_seed(s), noise_sharing="none"
        ).probability
        for s in range(3)
    ]
    assert any(p != 0.5 for p in unpaired)  # the official per-sample draws, on request


def test_lrm_accepts_paths_and_scores_them_as_the_decoded_images(pipes, tmp_path):
    pipe = pipes["lrm"]
    image = PIL.Image.effect_noise((40, 32), 50).convert("RGB")
    image.save(tmp_path / "x.png")
    from_path = pipe(PROMPT, images=str(tmp_path / "x.png"), generator=torch.Generator().manual_seed(0)).rewards
    from_pil = pipe(PROMPT, images=image, generator=torch.Generator().manual_seed(0)).rewards
    assert torch.equal(from_path, from_pil)  # the same decoded pixels and the same draws: the same computation


# ------------------------------------------------------------------------------------------ fuzzing
DTYPES = st.sampled_from([np.uint8, np.uint16, np.float32, np.float64, np.int64, np.bool_])


@st.composite
def arrays(draw):
    """Random images as numpy arrays: any side from 0, 1-5 channels or none, any dtype, NaN / Inf / huge values."""
    channels = draw(st.sampled_from([None, 1, 2, 3, 4, 5]))
    shape = (draw(st.integers(0, 48)), draw(st.integers(0, 48)), *(() if channels is None else (channels,)))
    dtype = draw(DTYPES)
    elements = None
    if np.issubdtype(dtype, np.floating):
        elements = st.floats(-2, 3, width=32) | st.sampled_from([np.nan, np.inf, -np.inf, 1e30, 0.0, 1.0])
    return draw(hnp.arrays(dtype, shape, elements=elements, fill=elements))


@pytest.mark.parametrize("family", ["sd3", "lrm"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=arrays(), as_tensor=st.booleans())
def test_fuzzed_images_give_finite_rewards_or_a_clear_error(pipes, family, image, as_tensor):
    pipe = pipes[family]
    if as_tensor and image.ndim == 3 and image.dtype not in (np.uint16,):
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    try:
        rewards = pipe(PROMPT, images=image, generator=torch.Generator().manual_seed(0)).rewards
    except (ValueError, TypeError) as error:
        assert str(error)
        return
    assert rewards.shape == (1,) and torch.isfinite(rewards).all()


@pytest.mark.parametrize("family", ["sd3", "lrm"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(0, 12), min_size=1, max_size=5),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32]),
    value=st.sampled_from([None, float("nan"), float("inf"), 1e30, -1e4]),
)
def test_fuzzed_latents_give_finite_rewards_or_a_clear_error(pipes, family, shape, dtype, value):
    pipe = pipes[family]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if value is not None and x.numel():
        x.view(-1)[0] = value
    try:
        rewards = pipe(PROMPT, latents=x.to(dtype), generator=torch.Generator().manual_seed(0)).rewards
    except (ValueError, TypeError) as error:
        assert str(error)
        return
    assert torch.isfinite(rewards).all()
