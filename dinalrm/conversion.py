"""Converting official checkpoints into this library's folders: DiNa-LRM's (github.com/HKUST-C4G/diffusion-rm) into
a `DiNaLRMModel` folder, and LRM's (github.com/Kwai-Kolors/LPO, `lrm/`) into an `LRMPipeline` folder. The commands
are `dinalrm convert dinalrm` and `dinalrm convert lrm` (`dinalrm.cli` parses their arguments).

LRM: the official `save()` writes `unet/` (the full fine-tuned UNet), `text_encoder/` [+ `text_encoder_2/` for SDXL]
when the text encoder was trained, and `state_dict.pt` (a pickle of `visual_projection`, [`text_projection`,] and
`logit_scale` as a Python float). Everything else (tokenizers, VAE, scheduler, a frozen text encoder) comes from the
base SD1.5 / SDXL pipeline, as in the official `load()`. The pickle is read with `torch.load(weights_only=True)`
(a `state_dict.safetensors` with the flat keys is read instead when there is no pickle). Every tensor the model
needs must come from the checkpoint (or, for a frozen text encoder, the base): a partial load stops with an error
naming the keys. The UNet's up path, which the LRM never runs, is dropped.
"""

import json
import logging
import os

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from modeling_lrm import UNUSED_UNET_PREFIXES, LRMModel
from pipeline_lrm import LRMPipeline


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERNS = ["unet/*", "text_encoder/*", "text_encoder_2/*", "state_dict.pt", "state_dict.safetensors"]


class LRMConversionError(ValueError):
    """The official LRM checkpoint cannot be converted faithfully."""


def resolve_official_dir(official_dir: str, revision: str | None = None) -> str:
    """A local folder as is; a Hub id is downloaded (only the checkpoint files) into the Hugging Face cache."""
    if os.path.isdir(official_dir):
        return official_dir
    from huggingface_hub import snapshot_download

    return snapshot_download(official_dir, revision=revision, allow_patterns=CHECKPOINT_PATTERNS)


def _weights_file_tensors(folder: str, stem: str) -> dict[str, torch.Tensor]:
    """All tensors of a saved diffusers / transformers component: one safetensors file or an indexed set of shards."""
    single = os.path.join(folder, f"{stem}.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index = single + ".index.json"
    if not os.path.isfile(index):
        raise LRMConversionError(f"No {stem}.safetensors (or its .index.json) in {folder}.")
    with open(index, encoding="utf-8") as handle:
        shards = sorted(set(json.load(handle)["weight_map"].values()))
    tensors = {}
    for shard in shards:
        tensors.update(load_file(os.path.join(folder, shard)))
    return tensors


def read_state_dict(official_dir: str) -> dict[str, torch.Tensor]:
    """`state_dict.pt` (nested, logit_scale a float) or `state_dict.safetensors` (flat) as flat tensors."""
    pickle_path = os.path.join(official_dir, "state_dict.pt")
    if os.path.isfile(pickle_path):
        raw = torch.load(pickle_path, map_location="cpu", weights_only=True)
        flat = {}
        for name, value in raw.items():
            if isinstance(value, dict):
                flat.update({f"{name}.{key}": tensor for key, tensor in value.items()})
            else:
                flat[name] = torch.as_tensor(value, dtype=torch.float32)
        return flat
    safetensors_path = os.path.join(official_dir, "state_dict.safetensors")
    if os.path.isfile(safetensors_path):
        return load_file(safetensors_path)
    raise LRMConversionError(f"Missing state_dict.pt (projections and logit_scale) in {official_dir}.")


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


def load_exactly(model: LRMModel, state: dict[str, torch.Tensor], expected: set[str]) -> None:
    """Loads `state`, insisting that its keys are exactly `expected` with matching shapes."""
    own = model.state_dict()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise LRMConversionError(
            f"the checkpoint does not match the model: missing keys {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}"
        )
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise LRMConversionError(f"shape mismatches (checkpoint vs model): {wrong[:10]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


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
    sdxl = DiffusionPipeline.load_config(base).get("text_encoder_2", [None])[0] is not None
    state, frozen = official_tensors(official_dir, sdxl)
    if "visual_projection.weight" not in state:
        raise LRMConversionError("state_dict.pt holds no visual_projection: this is not an official LRM checkpoint.")
    model = LRMModel.from_pipeline(
        base,
        text_projection_weight=state.get("text_projection.weight"),
        projection_dim=state["visual_projection.weight"].shape[0],
        guidance_scale=guidance_scale,
        multi_scale=multi_scale,
        multi_scale_cfg=multi_scale_cfg,
    )
    expected = {k for k in model.state_dict() if not k.startswith(tuple(f"{name}." for name in frozen))}
    load_exactly(model, state, expected)
    for name in frozen:
        logger.info("%s is not in the checkpoint (trained frozen): using the base pipeline's.", name)
    tokenizer_2 = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2") if sdxl else None
    return LRMPipeline(
        reward_model=model,
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae"),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        tokenizer_2=tokenizer_2,
    )


def _check_output_dir(output_dir: str, overwrite: bool) -> None:
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise SystemExit(f"{output_dir} is not empty; pass --overwrite to replace its files.")


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
    from modeling_dinalrm import (
        OFFICIAL_ALLOW_PATTERNS,
        SD35_MEDIUM_ID,
        ConversionError,
        ModelUnavailableError,
        convert_official_checkpoint,
        hub_errors,
        resolve_repo,
    )

    _check_output_dir(output_dir, overwrite)
    backbone = backbone or SD35_MEDIUM_ID
    try:
        official_dir, _ = resolve_repo(official_dir, OFFICIAL_ALLOW_PATTERNS, "DiNa-LRM checkpoint", official_revision)
        with hub_errors(backbone, "base model"):
            model = convert_official_checkpoint(official_dir, backbone, backbone_subfolder, revision)
    except (ConversionError, ModelUnavailableError, FileNotFoundError) as error:
        raise SystemExit(f"Conversion failed: {error}") from error
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
    _check_output_dir(output_dir, overwrite)
    try:
        pipeline = convert_official_lrm_checkpoint(
            official_dir,
            base,
            revision,
            guidance_scale=guidance_scale,
            multi_scale=multi_scale,
            multi_scale_cfg=multi_scale_cfg,
        )
    except (LRMConversionError, FileNotFoundError, OSError) as error:
        raise SystemExit(f"Conversion failed: {error}") from error
    pipeline.save_pretrained(output_dir)
    logger.info("Saved %s", output_dir)
