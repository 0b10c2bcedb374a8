"""The converters' error inputs (`scripts/convert_official_checkpoint.py`, `scripts/convert_official_lrm_checkpoint.py`
and the library code they call): each row damages a copy of an official tiny checkpoint or passes a bad path, and
the converter must exit non-zero with a message naming the problem, writing nothing."""

import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL_LRM_TINY, OFFICIAL_TINY, REPO_ROOT
from error_inputs import ErrorInput, assert_message, rows
from safetensors.torch import load_file, save_file


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Payload:
    """An object whose unpickling would run code (here: harmlessly raise), as a hostile pickle would."""

    def __reduce__(self):
        return (pytest.fail, ("the pickle's payload ran",))


# ------------------------------------------------------------------------------------------ DiNa-LRM checkpoints
def dinalrm_copy(tmp_path: Path) -> Path:
    target = tmp_path / "official"
    shutil.copytree(OFFICIAL_TINY, target, ignore=shutil.ignore_patterns("transformer", "*.md"))
    return target


def dinalrm(edit):
    """argv of the DiNa-LRM converter on a copy of the official tiny checkpoint changed by `edit(folder)`."""

    def build(tmp_path: Path) -> tuple[str, list[str]]:
        official = dinalrm_copy(tmp_path)
        extra = edit(official) or []
        argv = ["--official_dir", str(official), "--backbone", str(OFFICIAL_TINY / "transformer")]
        argv += ["--backbone_subfolder", "", "--output_dir", str(tmp_path / "out"), *extra]
        return "convert_official_checkpoint", argv

    return build


def head_file(official: Path, change) -> None:
    """Rewrites `rm_head` (safetensors; the pickle copy removed so it is the one read) with `change(state)`."""
    (official / "checkpoint" / "rm_head.pt").unlink()
    path = official / "checkpoint" / "rm_head.safetensors"
    state = load_file(path)
    change(state)
    save_file(state, path)


def first_float(state: dict) -> str:
    return next(key for key, value in state.items() if value.is_floating_point())


def int_head(official):
    head_file(official, lambda state: state.__setitem__(first_float(state), state[first_float(state)].long()))


def nan_head(official):
    head_file(official, lambda state: state[first_float(state)].view(-1).__setitem__(0, float("nan")))


def pickled_head(official):
    (official / "checkpoint" / "rm_head.safetensors").unlink()
    state = torch.load(official / "checkpoint" / "rm_head.pt", weights_only=True)
    state["payload"] = Payload()
    with open(official / "checkpoint" / "rm_head.pt", "wb") as handle:
        pickle.dump(state, handle)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def output_is_a_file(official):
    return []  # the row's builder writes the file


# ------------------------------------------------------------------------------------------ LRM checkpoints
def lrm(edit, base=None):
    """argv of the LRM converter on a copy of the official tiny LRM checkpoint changed by `edit(folder)`."""

    def build(tmp_path: Path) -> tuple[str, list[str]]:
        official = tmp_path / "official"
        shutil.copytree(
            OFFICIAL_LRM_TINY / "checkpoint", official, ignore=shutil.ignore_patterns("state_dict.safetensors")
        )
        edit(official)
        argv = ["--official_dir", str(official), "--base", base or str(OFFICIAL_LRM_TINY / "base")]
        return "convert_official_lrm_checkpoint", [*argv, "--output_dir", str(tmp_path / "out")]

    return build


def lrm_state(change):
    def edit(official):
        state = torch.load(official / "state_dict.pt", weights_only=True)
        change(state)
        torch.save(state, official / "state_dict.pt")

    return edit


def lrm_unet(change):
    def edit(official):
        path = official / "unet" / "diffusion_pytorch_model.safetensors"
        state = load_file(path)
        change(state)
        save_file(state, path)

    return edit


def lrm_pickle(official):
    state = torch.load(official / "state_dict.pt", weights_only=True)
    state["payload"] = Payload()
    with open(official / "state_dict.pt", "wb") as handle:
        pickle.dump(state, handle)


def nothing(official):
    return None


CONVERTER_ERROR_INPUTS = [
    ErrorInput("DiNa: int64 head tensor", dinalrm(int_head), SystemExit, r"integer tensors .*torch\.int64"),
    ErrorInput("DiNa: NaN head weight", dinalrm(nan_head), SystemExit, "NaN or infinite weights"),
    ErrorInput(
        "DiNa: pickled head with a payload",
        dinalrm(pickled_head),
        SystemExit,
        r"rm_head\.pt is a pickle .*not loaded.*safetensors",
    ),
    ErrorInput(
        "DiNa: truncated safetensors head",
        dinalrm(lambda o: truncate(o / "checkpoint" / "rm_head.safetensors")),
        SystemExit,
        r"rm_head\.safetensors is truncated or damaged",
    ),
    ErrorInput(
        "DiNa: truncated config.json",
        dinalrm(lambda o: truncate(o / "config.json")),
        SystemExit,
        r"config\.json is not valid JSON",
    ),
    ErrorInput(
        "DiNa: config.json is a list",
        dinalrm(lambda o: (o / "config.json").write_text("[1]") and None),
        SystemExit,
        "no `model` section",
    ),
    ErrorInput(
        "DiNa: missing local official folder",
        lambda t: (
            "convert_official_checkpoint",
            ["--official_dir", str(t / "nope" / "x"), "--output_dir", str(t / "out")],
        ),
        SystemExit,
        "does not exist: no such folder",
    ),
    ErrorInput(
        "DiNa: missing local backbone folder",
        dinalrm(lambda o: ["--backbone", str(o / "no" / "such" / "transformer")]),
        SystemExit,
        "base model .* does not exist: no such folder",
    ),
    ErrorInput(
        "DiNa: output_dir is a file",
        dinalrm(lambda o: ["--output_dir", str(o / "config.json")]),
        SystemExit,
        "is a file, not a folder",
    ),
    ErrorInput(
        "DiNa: output_dir is the official folder",
        dinalrm(lambda o: ["--output_dir", str(o), "--overwrite"]),
        SystemExit,
        "overlaps the input",
    ),
    ErrorInput(
        "LRM: string logit_scale",
        lrm(lrm_state(lambda s: s.__setitem__("logit_scale", "3.7"))),
        SystemExit,
        "logit_scale is a str",
    ),
    ErrorInput(
        "LRM: NaN projection",
        lrm(lrm_state(lambda s: s["visual_projection"]["weight"].view(-1).__setitem__(0, float("nan")))),
        SystemExit,
        "NaN or infinite weights",
    ),
    ErrorInput(
        "LRM: infinite logit_scale",
        lrm(lrm_state(lambda s: s.__setitem__("logit_scale", float("inf")))),
        SystemExit,
        "NaN or infinite",
    ),
    ErrorInput(
        "LRM: NaN unet weight",
        lrm(lrm_unet(lambda s: s[first_float(s)].view(-1).__setitem__(0, float("nan")))),
        SystemExit,
        "NaN or infinite weights",
    ),
    ErrorInput(
        "LRM: int64 unet tensor",
        lrm(lrm_unet(lambda s: s.__setitem__(first_float(s), s[first_float(s)].long()))),
        SystemExit,
        "integer tensors",
    ),
    ErrorInput("LRM: pickled state_dict.pt", lrm(lrm_pickle), SystemExit, r"state_dict\.pt is a pickle .*not loaded"),
    ErrorInput(
        "LRM: truncated state_dict.pt",
        lrm(lambda o: truncate(o / "state_dict.pt")),
        SystemExit,
        r"state_dict\.pt is truncated or damaged",
    ),
    ErrorInput(
        "LRM: truncated unet safetensors",
        lrm(lambda o: truncate(o / "unet" / "diffusion_pytorch_model.safetensors")),
        SystemExit,
        "truncated or damaged",
    ),
    ErrorInput(
        "LRM: missing local official folder",
        lambda t: (
            "convert_official_lrm_checkpoint",
            [
                "--official_dir",
                str(t / "no" / "such"),
                "--base",
                str(OFFICIAL_LRM_TINY / "base"),
                "--output_dir",
                str(t / "out"),
            ],
        ),
        SystemExit,
        "does not exist: no such folder",
    ),
    ErrorInput(
        "LRM: missing local base folder",
        lrm(nothing, base="./no/such/base"),
        SystemExit,
        "base pipeline .* does not exist",
    ),
    ErrorInput(
        "LRM: output_dir is a file",
        lambda t: (
            "convert_official_lrm_checkpoint",
            [
                "--official_dir",
                str(OFFICIAL_LRM_TINY / "checkpoint"),
                "--base",
                str(OFFICIAL_LRM_TINY / "base"),
                "--output_dir",
                str(OFFICIAL_LRM_TINY / "README.md"),
            ],
        ),
        SystemExit,
        "is a file, not a folder",
    ),
    ErrorInput(
        "LRM: output_dir inside the official folder",
        lambda t: (
            "convert_official_lrm_checkpoint",
            [
                "--official_dir",
                str(OFFICIAL_LRM_TINY / "checkpoint"),
                "--base",
                str(OFFICIAL_LRM_TINY / "base"),
                "--output_dir",
                str(OFFICIAL_LRM_TINY / "checkpoint" / "unet"),
                "--overwrite",
            ],
        ),
        SystemExit,
        "overlaps the input",
    ),
]


@pytest.mark.parametrize("row", rows(CONVERTER_ERROR_INPUTS))
def test_converter_error_inputs(row, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    script, argv = row.input(tmp_path)
    with pytest.raises(row.error) as raised:
        load_script(script).main(argv)
    message = str(raised.value)
    assert raised.value.code not in (0, None)
    assert_message(row, message)
    assert "weights_only=False" not in message and "will likely succeed" not in message
    assert not (tmp_path / "out").exists()


def test_official_config_with_bad_json_names_the_file(tmp_path):
    """The library call the converter makes, directly: a ConversionError (a ValueError), not a JSONDecodeError."""
    from modeling_dinalrm import ConversionError, convert_official_checkpoint

    official = dinalrm_copy(tmp_path)
    (official / "config.json").write_text(json.dumps({"model": {}})[:-3])
    with pytest.raises(ConversionError, match="config.json is not valid JSON"):
        convert_official_checkpoint(official, OFFICIAL_TINY / "transformer", backbone_subfolder=None)
