#!/usr/bin/env python
"""Convert an official LRM checkpoint (github.com/Kwai-Kolors/LPO, `lrm/`) into an `LRMPipeline` folder.

The official `save()` writes `unet/` (the full fine-tuned UNet), `text_encoder/` [+ `text_encoder_2/` for SDXL] when
the text encoder was trained, and `state_dict.pt` (a pickle of `visual_projection`, [`text_projection`,] and
`logit_scale` as a Python float). Everything else (tokenizers, VAE, scheduler, a frozen text encoder) comes from the
base SD1.5 / SDXL pipeline, as in the official `load()`. The pickle is read with `torch.load(weights_only=True)`
(a `state_dict.safetensors` with the flat keys is read instead when there is no pickle). Every tensor the model
needs must come from the checkpoint (or, for a frozen text encoder, the base): a partial load stops with an error
naming the keys. The UNet's up path, which the LRM never runs, is dropped.

    python scripts/convert_official_lrm_checkpoint.py --official_dir DIR_OR_ID \
        --base sd-legacy/stable-diffusion-v1-5 --output_dir lrm-sd15

The output is a pipeline folder (`LRMPipeline`, `reward_model/` with `modeling_lrm.py`); the reward model alone
loads with `AutoModel.from_pretrained(OUT, subfolder="reward_model", trust_remote_code=True)`.
"""

import argparse
import json
import logging
import os

import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from transformers import CLIPTokenizer

from dinalrm.hub import check_output_dir
from modeling_dinalrm import (
    ConversionError,
    ModelUnavailableError,
    load_pickled_weights,
    load_state_exactly,
    read_safetensors_weights,
    require_finite_weights,
    require_local_folder,
    resolve_repo,
)
from modeling_lrm import UNUSED_UNET_PREFIXES, LRMModel
from pipeline_lrm import LRMPipeline


logger = logging.getLogger("convert_official_lrm_checkpoint")

CHECKPOINT_PATTERNS = ["unet/*", "text_encoder/*", "text_encoder_2/*", "state_dict.pt", "state_dict.safetensors"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official_dir", required=True, help="Official checkpoint: a folder or a Hub repository id.")
    parser.add_argument("--base", required=True, help="The SD1.5 / SDXL diffusers pipeline (Hub id or folder).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--revision", default=None, help="Revision of --official_dir on the Hub.")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="VFE guidance (official: 7.5).")
    parser.add_argument("--no_multi_scale", action="store_true", help="The checkpoint pools the mid block only.")
    parser.add_argument("--multi_scale_cfg", action="store_true", help="VFE on the down-block features too.")
    parser.add_argument("--overwrite", action="store_true", help="Allow writing into a non-empty output_dir.")
    return parser.parse_args(argv)


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


def convert(
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


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_output_dir(args.output_dir, [args.official_dir, args.base], args.overwrite)
    try:
        pipeline = convert(
            args.official_dir,
            args.base,
            args.revision,
            guidance_scale=args.guidance_scale,
            multi_scale=not args.no_multi_scale,
            multi_scale_cfg=args.multi_scale_cfg,
        )
    except (ConversionError, ModelUnavailableError, FileNotFoundError, OSError) as error:
        raise SystemExit(f"Conversion failed: {error}") from None
    pipeline.save_pretrained(args.output_dir)
    logger.info("Saved %s", args.output_dir)


if __name__ == "__main__":
    main()
