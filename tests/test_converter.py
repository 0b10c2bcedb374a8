"""The official-checkpoint converter: other official configs, and refusal of anything but a complete load.

The conversions run `dinalrm convert dinalrm` in this process (`run_converter`); the script's own command line, in a
fresh interpreter as a user runs it, is `test_the_script_refuses_non_finite_weights_without_writing`'s."""

import json
import shutil

import pytest
import tolerances
import torch
from conftest import OFFICIAL_TINY, copy_official, run_converter
from safetensors.torch import load_file, save_file

from modeling_dinalrm import DEFAULT_LORA_TARGET_MODULES, ConversionError, DiNaLRMModel, convert_official_checkpoint


def write_official_checkpoint(model: DiNaLRMModel, folder, model_section: dict) -> None:
    """Writes `model` in the official layout: config.json, checkpoint/backbone_lora (peft keys), rm_head.pt."""
    lora = folder / "checkpoint" / "backbone_lora"
    lora.mkdir(parents=True)
    adapter = {}
    for name, value in model.state_dict().items():
        if ".lora_" in name:
            adapter["base_model.model." + name.removeprefix("backbone.").replace(".default.weight", ".weight")] = value
    save_file(adapter, lora / "adapter_model.safetensors")
    adapter_config = json.loads((OFFICIAL_TINY / "checkpoint" / "backbone_lora" / "adapter_config.json").read_text())
    adapter_config.update(r=model.config.lora_rank, lora_alpha=model.config.lora_alpha)
    (lora / "adapter_config.json").write_text(json.dumps(adapter_config))
    head = {k.removeprefix("reward_head."): v for k, v in model.state_dict().items() if k.startswith("reward_head.")}
    torch.save(head, folder / "checkpoint" / "rm_head.pt")
    (folder / "config.json").write_text(json.dumps({"model": model_section, "training": {}}))


def randomize(model: DiNaLRMModel, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def test_other_official_configs_convert_faithfully(tmp_path, official_inputs):
    """3 blocks, unsorted visual indices, an embeddings-level text layer, W != C (proj_in), 2 queries, 2 heads,
    and the official LoRA exclusion of the last block's context projections (no text feature taken there)."""
    last = 3
    excluded = {
        f"transformer_blocks.{last - 1}.attn.{p}" for p in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    }
    source = DiNaLRMModel.from_backbone(
        OFFICIAL_TINY / "transformer",
        num_layers=last,
        visual_layers=[1, 3],
        text_layers=[0, 2],
        head_width=16,
        head_num_queries=2,
        head_num_heads=2,
        head_use_proj_in=True,
    ).eval()
    suffixes = tuple("." + name for name in DEFAULT_LORA_TARGET_MODULES)
    targets = sorted(n for n, _ in source.backbone.named_modules() if n.endswith(suffixes) and n not in excluded)
    source.add_lora(rank=2, alpha=6, target_modules=targets)
    randomize(source, seed=0)
    official = tmp_path / "official"
    write_official_checkpoint(
        source,
        official,
        {
            "model_type": "thurstone",
            "num_transformer_layers": last,
            "use_lora": True,
            "freeze_backbone": False,
            "visual_head_idx": [3, 1],
            "text_head_idx": [2, 0],
            "use_logistic": False,
            "lora_config": {"r": 2, "lora_alpha": 6},
            "reward_head": {
                "use_proj_in": True,
                "width": 16,
                "out_dim": 1,
                "num_queries": 2,
                "num_attn_heads": 2,
                "dropout": 0.0,
            },
        },
    )
    result = run_converter(official, tmp_path / "out", "--keep_lora_adapter")
    assert result.returncode == 0, result.stderr
    converted = DiNaLRMModel.from_pretrained(tmp_path / "out").eval()
    assert converted.config.visual_layers == [1, 3] and converted.config.text_layers == [0, 2]
    assert set(converted.lora_layers()) == set(targets)
    x = official_inputs
    with torch.no_grad():
        expected = source.score_latents(
            x["x0"], x["encoder_hidden_states"], x["pooled_projections"], noise=x["noise_single"]
        )
        actual = converted.score_latents(
            x["x0"], x["encoder_hidden_states"], x["pooled_projections"], noise=x["noise_single"]
        )
    tolerances.assert_close(actual, expected)


def _failing(official, tmp_path, python: str | None = None) -> str:
    result = run_converter(official, tmp_path / "out", python=python)
    assert result.returncode != 0
    assert not (tmp_path / "out" / "model.safetensors").exists()
    return result.stderr


def test_missing_head_file_is_named(tmp_path):
    official = copy_official(tmp_path)
    for name in ("rm_head.pt", "rm_head.safetensors"):
        (official / "checkpoint" / name).unlink()
    assert "rm_head.pt" in _failing(official, tmp_path)


def test_unexpected_and_missing_head_keys_are_named(tmp_path):
    official = copy_official(tmp_path)
    head = load_file(official / "checkpoint" / "rm_head.safetensors")
    head["extra.weight"] = torch.zeros(1)
    del head["query_tokens"]
    save_file(head, official / "checkpoint" / "rm_head.safetensors")
    stderr = _failing(official, tmp_path)
    assert "extra.weight" in stderr and "query_tokens" in stderr


def test_head_shape_mismatch_is_named(tmp_path):
    official = copy_official(tmp_path)
    head = load_file(official / "checkpoint" / "rm_head.safetensors")
    head["query_tokens"] = torch.zeros(1, 3, 32)
    save_file(head, official / "checkpoint" / "rm_head.safetensors")
    stderr = _failing(official, tmp_path)
    assert "shape" in stderr and "query_tokens" in stderr


def test_lora_saved_one_level_deeper_is_refused_not_silently_dropped(tmp_path):
    """peft would only warn and leave lora_B at zero (the no-LoRA model); the converter must stop."""
    official = copy_official(tmp_path)
    path = official / "checkpoint" / "backbone_lora" / "adapter_model.safetensors"
    adapter = load_file(path)
    nested = {k.replace("base_model.model.", "base_model.model.backbone."): v for k, v in adapter.items()}
    save_file(nested, path)
    assert "LoRA modules in the checkpoint but not in the backbone" in _failing(official, tmp_path)


def test_missing_lora_half_is_named(tmp_path):
    official = copy_official(tmp_path)
    path = official / "checkpoint" / "backbone_lora" / "adapter_model.safetensors"
    adapter = load_file(path)
    del adapter["base_model.model.transformer_blocks.1.attn.to_q.lora_B.weight"]
    save_file(adapter, path)
    assert "lora_B for transformer_blocks.1.attn.to_q" in _failing(official, tmp_path)


def test_unsupported_official_options_are_refused(tmp_path):
    official = copy_official(tmp_path)
    config = json.loads((official / "config.json").read_text())
    config["model"]["reward_head"]["out_dim"] = 2
    (official / "config.json").write_text(json.dumps(config))
    assert "out_dim=2" in _failing(official, tmp_path)


def test_existing_output_is_not_overwritten_without_asking(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = run_converter(OFFICIAL_TINY, out)
    assert result.returncode != 0 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "user data" and not (out / "config.json").exists()
    shutil.rmtree(out)


def _truncate(path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _poison(path) -> None:
    """Puts NaN into the first floating tensor of a safetensors or .pt weights file, and infinity into the last."""
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    floats = [key for key, value in state.items() if value.is_floating_point()]
    state[floats[0]] = torch.full_like(state[floats[0]], float("nan"))
    state[floats[-1]] = torch.full_like(state[floats[-1]], float("inf"))
    save_file(state, path) if path.suffix == ".safetensors" else torch.save(state, path)


@pytest.mark.parametrize("damage", [_truncate, _poison])
@pytest.mark.parametrize(
    "file",
    ["checkpoint/backbone_lora/adapter_model.safetensors", "checkpoint/rm_head.pt", "checkpoint/rm_head.safetensors"],
)
def test_truncated_or_non_finite_official_weights_are_refused_naming_the_file(tmp_path, file, damage):
    official = copy_official(tmp_path)
    if file == "checkpoint/rm_head.pt":  # the safetensors copy would be read first
        (official / "checkpoint" / "rm_head.safetensors").unlink()
    damage(official / file)
    expected = "truncated or damaged" if damage is _truncate else "NaN or infinite weights"
    with pytest.raises(ConversionError, match=expected) as error:
        convert_official_checkpoint(official, OFFICIAL_TINY / "transformer", backbone_subfolder=None)
    assert str(official / file) in str(error.value)


@pytest.mark.slow  # the converter script's command line: 5-15 s on a shared 2-core machine
def test_the_script_refuses_non_finite_weights_without_writing(tmp_path, warm_python):
    official = copy_official(tmp_path)
    _poison(official / "checkpoint" / "rm_head.safetensors")
    stderr = _failing(official, tmp_path, python=warm_python)
    assert "rm_head.safetensors holds NaN or infinite weights" in stderr and "Traceback" not in stderr
