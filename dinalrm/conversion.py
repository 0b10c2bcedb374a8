"""Converting official checkpoints into this library's folders: DiNa-LRM's (github.com/HKUST-C4G/diffusion-rm) into
a `DiNaLRMModel` folder, and LRM's (github.com/Kwai-Kolors/LPO, `lrm/`) into an `LRMPipeline` folder. The commands
are `dinalrm convert dinalrm` and `dinalrm convert lrm` (`dinalrm.cli` parses their arguments).

LRM: the official `save()` writes `unet/` (the full fine-tuned UNet), `text_encoder/` [+ `text_encoder_2/` for SDXL]
when the text encoder was trained, and `state_dict.pt` (a pickle of `visual_projection`, [`text_projection`,] and
`logit_scale` as a Python float). Everything else (tokenizers, VAE, scheduler, a frozen text encoder) comes from the
base SD1.5 / SDXL pipeline, as in the official `load()`. The pickle is read with `torch.load(weights_only=True)`
(a `state_dict.safetensors` with the flat keys is read first when present; a pickle that would run code is refused). Every tensor the model
needs must come from the checkpoint (or, for a frozen text encoder, the base): a partial load stops with an error
naming the keys. The UNet's up path, which the LRM never runs, is dropped.
"""

import json
import logging
import os

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from transformers import CLIPTokenizer

from dinalrm.hub import check_output_dir
from modeling_dinalrm import (
    OFFICIAL_ALLOW_PATTERNS,
    SD35_MEDIUM_ID,
    ConversionError,
    ModelUnavailableError,
    convert_official_checkpoint,
    hub_errors,
    load_pickled_weights,
    load_state_exactly,
    read_safetensors_weights,
    require_finite_weights,
    require_local_folder,
    resolve_repo,
)
from modeling_lrm import UNUSED_UNET_PREFIXES, LRMModel
from pipeline_lrm import LRMPipeline


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERNS = ["unet/*", "text_encoder/*", "text_encoder_2/*", "state_dict.pt", "state_dict.safetensors"]


def resolve_official_dir(official_dir: str, revision: str | None = None) -> str:
    """A local folder as is; a Hub id is downloaded (only the checkpoint files) into the Hugging Face cache."""
    return resolve_repo(official_dir, CHECKPOINT_PATTERNS, "LRM checkpoint", revision)[0]


def _weights_file_tensors(folder: str, stem: str) -> dict[str, torch.Tensor]:
    """All tensors of a saved diffusers / transformers component: one safetensors file or an indexed set of shards."""
    single = os.path.join(folder, f"{stem}.safetensors")
    if os.path.isfile(single):
        return read_safetensors_weights(single)
    index = single + ".index.json"
    if not os.path.isfile(index):
        raise ConversionError(f"No {stem}.safetensors (or its .index.json) in {folder}.")
    try:
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ConversionError(f"{index} is not a safetensors index ({error!r}): download it again.") from None
    tensors = {}
    for shard in shards:
        tensors.update(read_safetensors_weights(os.path.join(folder, shard)))
    return tensors


def read_state_dict(official_dir: str) -> dict[str, torch.Tensor]:
    """`state_dict.pt` (nested, logit_scale a float) or `state_dict.safetensors` (flat) as flat tensors."""
    pickle_path = os.path.join(official_dir, "state_dict.pt")
    safetensors_path = os.path.join(official_dir, "state_dict.safetensors")
    if os.path.isfile(safetensors_path):
        return read_safetensors_weights(safetensors_path)
    if os.path.isfile(pickle_path):
        raw = load_pickled_weights(pickle_path)
        if not isinstance(raw, dict):
            raise ConversionError(f"{pickle_path} holds a {type(raw).__name__}, not the official state dict.")
        flat = {}
        for name, value in raw.items():
            entries = value.items() if isinstance(value, dict) else [(None, value)]
            for key, tensor in entries:
                full = name if key is None else f"{name}.{key}"
                if isinstance(tensor, (int, float)) and not isinstance(tensor, bool):
                    tensor = torch.tensor(float(tensor))
                if not isinstance(tensor, torch.Tensor):
                    raise ConversionError(
                        f"{pickle_path}: {full} is a {type(tensor).__name__} ({tensor!r:.40}), not a tensor or a "
                        "number: this is not an official LRM state dict."
                    )
                flat[full] = tensor
        return require_finite_weights(flat, pickle_path)
    raise ConversionError(f"Missing state_dict.pt (projections and logit_scale) in {official_dir}.")


def official_tensors(official_dir: str, sdxl: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The checkpoint's tensors under the model's keys, and the text encoders it does not hold (frozen ones)."""
    state = {
        f"unet.{k}": v
        for k, v in _weights_file_tensors(os.path.join(official_dir, "unet"), "diffusion_pytorch_model").items()
    }
    state = {k: v for k, v in state.items() if not k.removeprefix("unet.").startswith(UNUSED_UNET_PREFIXES)}
    frozen = []
    for name in ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",):
        folder = os.path.join(official_dir, name)
        if os.path.isdir(folder):
            state.update({f"{name}.{k}": v for k, v in _weights_file_tensors(folder, "model").items()})
        else:
            frozen.append(name)
    state.update(read_state_dict(official_dir))
    return state, frozen


def convert_official_lrm_checkpoint(
    official_dir: str,
    base: str,
    revision: str | None = None,
    guidance_scale: float = 7.5,
    multi_scale: bool = True,
    multi_scale_cfg: bool = False,
) -> LRMPipeline:
    """An `LRMPipeline` holding exactly the official checkpoint's weights on the base pipeline's VAE and tokenizers."""
    official_dir = resolve_official_dir(official_dir, revision)
    require_local_folder(base, "base pipeline")
    sdxl = DiffusionPipeline.load_config(base).get("text_encoder_2", [None])[0] is not None
    state, frozen = official_tensors(official_dir, sdxl)
    if "visual_projection.weight" not in state:
        raise ConversionError("state_dict.pt holds no visual_projection: this is not an official LRM checkpoint.")
    model = LRMModel.from_pipeline(
        base,
        text_projection_weight=state.get("text_projection.weight"),
        projection_dim=state["visual_projection.weight"].shape[0],
        guidance_scale=guidance_scale,
        multi_scale=multi_scale,
        multi_scale_cfg=multi_scale_cfg,
    )
    expected = {k for k in model.state_dict() if not k.startswith(tuple(f"{name}." for name in frozen))}
    load_state_exactly(model, state, expected, "the checkpoint does not match the model")
    for name in frozen:
        logger.info("%s is not in the checkpoint (trained frozen): using the base pipeline's.", name)
    tokenizer_2 = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2") if sdxl else None
    return LRMPipeline(
        reward_model=model,
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae"),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        tokenizer_2=tokenizer_2,
    )


def convert_dinalrm_folder(
    official_dir: str,
    output_dir: str,
    backbone: str | None = None,
    backbone_subfolder: str | None = "transformer",
    revision: str | None = None,
    official_revision: str | None = None,
    merge_lora: bool = True,
    overwrite: bool = False,
) -> None:
    """Converts an official DiNa-LRM checkpoint (folder or Hub id) on the SD3 transformer `backbone` (default:
    SD3.5-Medium's) and saves it to `output_dir` (LoRA merged unless `merge_lora=False`). Exits with the reason
    when the checkpoint cannot be converted or `output_dir` holds files and `overwrite` is not set."""
    backbone = backbone or SD35_MEDIUM_ID
    check_output_dir(output_dir, [official_dir, backbone], overwrite)
    try:
        official_dir, _ = resolve_repo(official_dir, OFFICIAL_ALLOW_PATTERNS, "DiNa-LRM checkpoint", official_revision)
        with hub_errors(backbone, "base model"):
            model = convert_official_checkpoint(official_dir, backbone, backbone_subfolder, revision)
    except (ConversionError, ModelUnavailableError, FileNotFoundError) as error:
        raise SystemExit(f"Conversion failed: {error}") from None
    model.save_pretrained(output_dir, merge_lora=merge_lora)
    logger.info("Saved %s (%s LoRA)", output_dir, "merged" if merge_lora else "adapter")


def convert_lrm_folder(
    official_dir: str,
    base: str,
    output_dir: str,
    revision: str | None = None,
    guidance_scale: float = 7.5,
    multi_scale: bool = True,
    multi_scale_cfg: bool = False,
    overwrite: bool = False,
) -> None:
    """[`convert_official_lrm_checkpoint`] saved to `output_dir`; exits with the reason when the checkpoint cannot
    be converted or `output_dir` holds files and `overwrite` is not set."""
    check_output_dir(output_dir, [official_dir, base], overwrite)
    try:
        pipeline = convert_official_lrm_checkpoint(
            official_dir,
            base,
            revision,
            guidance_scale=guidance_scale,
            multi_scale=multi_scale,
            multi_scale_cfg=multi_scale_cfg,
        )
    except (ConversionError, ModelUnavailableError, FileNotFoundError, OSError) as error:
        raise SystemExit(f"Conversion failed: {error}") from None
    pipeline.save_pretrained(output_dir)
    logger.info("Saved %s", output_dir)
