#!/usr/bin/env python
"""Convert an official DiNa-LRM checkpoint (github.com/HKUST-C4G/diffusion-rm) into a `DiNaLRMModel` folder.

The official layout is a folder with `config.json` (the run's YAML config as JSON) and `checkpoint/` holding
either `backbone_lora/` (a peft adapter) + `rm_head.pt` (LoRA runs), `rm_head.pt` alone (frozen backbone) or
`full_model.pt` (full fine-tuning). The backbone's pretrained blocks come from a diffusers SD3 transformer.

Every tensor of the checkpoint must land in the model and every model tensor that the checkpoint is meant to
provide must be present: a partial load stops with an error naming the keys (peft itself would only warn and
leave LoRA at zero, i.e. silently the no-LoRA model).

    python scripts/convert_official_checkpoint.py --official_dir DIR --backbone stabilityai/stable-diffusion-3.5-medium \
        --output_dir dinalrm-sd35m [--keep_lora_adapter]
"""

import argparse
import json
import logging
import os

import torch
from safetensors.torch import load_file

from modeling_dinalrm import DiNaLRMModel


logger = logging.getLogger("convert_official_checkpoint")

PEFT_PREFIX = "base_model.model."
LOSS_TYPES = {"thurstone": "thurstone", "bt": "bradley_terry", "bradley_terry": "bradley_terry"}


class ConversionError(ValueError):
    """The official checkpoint cannot be converted faithfully."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official_dir", required=True, help="Folder with config.json and checkpoint/.")
    parser.add_argument(
        "--backbone", required=True, help="SD3 transformer: Hub id or folder (pipeline or transformer)."
    )
    parser.add_argument("--backbone_subfolder", default="transformer")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--keep_lora_adapter", action="store_true", help="Save LoRA as an adapter instead of merging it."
    )
    parser.add_argument("--overwrite", action="store_true", help="Allow writing into a non-empty output_dir.")
    return parser.parse_args(argv)


def _require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise ConversionError(f"Missing {what}: {path}")
    return path


def _load_tensors(stem: str) -> dict[str, torch.Tensor]:
    """Reads `<stem>.safetensors` if present, else the pickle `<stem>.pt` with `weights_only=True`."""
    if os.path.isfile(stem + ".safetensors"):
        return load_file(stem + ".safetensors")
    state = torch.load(_require(stem + ".pt", "weights"), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{stem}.pt is not a state dict of tensors.")
    return state


def _model_kwargs(model_cfg: dict) -> dict:
    """Maps the official `model:` section to `DiNaLRMModel.from_backbone` keyword arguments."""
    if model_cfg.get("use_logistic"):
        raise ConversionError("use_logistic=true (logistic output squashing) is not supported.")
    head = model_cfg.get("reward_head", {})
    if head.get("out_dim", 1) != 1:
        raise ConversionError(f"reward_head.out_dim={head['out_dim']}: only scalar rewards are supported.")
    loss = LOSS_TYPES.get(model_cfg.get("model_type", "thurstone"))
    if loss is None:
        raise ConversionError(f"Unknown official model_type {model_cfg.get('model_type')!r}.")
    width = head.get("width", -1)
    return {
        "num_layers": model_cfg["num_transformer_layers"],
        # The official backbone collects features in block order, whatever order the lists are written in.
        "visual_layers": sorted(model_cfg["visual_head_idx"]),
        "text_layers": sorted(model_cfg.get("text_head_idx") or []),
        "head_width": None if width == -1 else width,
        "head_num_queries": head.get("num_queries", 4),
        "head_num_heads": head.get("num_attn_heads", 8),
        "head_dropout": head.get("dropout", 0.0),
        "head_use_proj_in": head.get("use_proj_in", False),
        "loss_type": loss,
    }


def _lora_adapter(lora_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    adapter_config = json.load(open(_require(os.path.join(lora_dir, "adapter_config.json"), "LoRA config")))
    for flag in ("use_rslora", "use_dora"):
        if adapter_config.get(flag):
            raise ConversionError(f"LoRA with {flag}=true is not supported.")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if adapter_config.get(pattern):
            raise ConversionError(f"LoRA with a non-empty {pattern} is not supported.")
    weights = load_file(_require(os.path.join(lora_dir, "adapter_model.safetensors"), "LoRA weights"))
    return adapter_config, weights


def _lora_state(weights: dict[str, torch.Tensor]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Official adapter keys -> (module paths inside the backbone, model state dict entries)."""
    modules, state = set(), {}
    for key, value in weights.items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ConversionError(f"Unexpected key in the LoRA adapter: {key}")
        module, _, part = key[len(PEFT_PREFIX) :].rpartition(".lora_")
        modules.add(module)
        state[f"backbone.{module}.lora_{part.removesuffix('.weight')}.default.weight"] = value
    for module in sorted(modules):
        for side in ("A", "B"):
            if f"backbone.{module}.lora_{side}.default.weight" not in state:
                raise ConversionError(f"LoRA adapter has no lora_{side} for {module}.")
    return sorted(modules), state


def _load_exactly(model: torch.nn.Module, state: dict[str, torch.Tensor], expected: set[str], what: str) -> None:
    """Loads `state` into `model`, insisting that its keys are exactly `expected` with matching shapes."""
    own = model.state_dict()
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ConversionError(f"{what}: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ConversionError(f"{what}: shape mismatches {wrong[:10]}")
    result = model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    if result.unexpected_keys:
        raise ConversionError(f"{what}: keys not consumed {result.unexpected_keys[:10]}")


def convert(
    official_dir: str,
    backbone: str,
    backbone_subfolder: str | None = "transformer",
    revision: str | None = None,
) -> DiNaLRMModel:
    """Builds a `DiNaLRMModel` holding exactly the official checkpoint's weights (LoRA kept as an adapter)."""
    config = json.load(open(_require(os.path.join(official_dir, "config.json"), "official config")))
    model_cfg = config["model"]
    checkpoint = os.path.join(official_dir, "checkpoint")
    kwargs = _model_kwargs(model_cfg)

    if model_cfg.get("use_lora"):
        adapter_config, weights = _lora_adapter(
            _require(os.path.join(checkpoint, "backbone_lora"), "LoRA adapter dir")
        )
        modules, lora_state = _lora_state(weights)
        model = DiNaLRMModel.from_backbone(backbone, subfolder=backbone_subfolder, revision=revision, **kwargs)
        unknown = sorted(set(modules) - {name for name, _ in model.backbone.named_modules()})
        if unknown:
            raise ConversionError(f"LoRA modules in the checkpoint but not in the backbone: {unknown[:10]}")
        model.add_lora(adapter_config["r"], adapter_config["lora_alpha"], target_modules=modules)
        if set(model.lora_layers()) != set(modules):
            raise ConversionError(f"LoRA landed on {sorted(model.lora_layers())[:10]}, expected {modules[:10]}")
        _load_exactly(model, lora_state, {k for k in model.state_dict() if ".lora_" in k}, "LoRA adapter")
        _load_exactly(
            model, _prefixed(_load_tensors(os.path.join(checkpoint, "rm_head"))), head_keys(model), "rm_head"
        )
    elif model_cfg.get("freeze_backbone"):
        model = DiNaLRMModel.from_backbone(backbone, subfolder=backbone_subfolder, revision=revision, **kwargs)
        _load_exactly(
            model, _prefixed(_load_tensors(os.path.join(checkpoint, "rm_head"))), head_keys(model), "rm_head"
        )
    else:
        model = DiNaLRMModel.from_backbone(backbone, subfolder=backbone_subfolder, revision=revision, **kwargs)
        _load_exactly(
            model, _load_tensors(os.path.join(checkpoint, "full_model")), set(model.state_dict()), "full_model"
        )
    return model


def _prefixed(head_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"reward_head.{k}": v for k, v in head_state.items()}


def head_keys(model: DiNaLRMModel) -> set[str]:
    return {k for k in model.state_dict() if k.startswith("reward_head.")}


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite:
        raise SystemExit(f"{args.output_dir} is not empty; pass --overwrite to replace its files.")
    try:
        model = convert(args.official_dir, args.backbone, args.backbone_subfolder or None, args.revision)
    except (ConversionError, FileNotFoundError) as error:
        raise SystemExit(f"Conversion failed: {error}") from error
    model.save_pretrained(args.output_dir, merge_lora=not args.keep_lora_adapter)
    logger.info("Saved %s (%s LoRA)", args.output_dir, "adapter" if args.keep_lora_adapter else "merged")


if __name__ == "__main__":
    main()
