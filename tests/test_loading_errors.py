"""Loading a model or pipeline from a damaged or mistyped location stops with an error naming the file or path and
the fix (issue 14): never a raw library error, never the full-size default model built from nothing."""

import shutil

import pytest
import torch
from conftest import OFFICIAL_TINY, REPO_ROOT

from dinalrm import cli
from modeling_dinalrm import DiNaLRMModel, ModelUnavailableError
from pipeline_dinalrm import DiNaLRMPipeline


BUNDLED = REPO_ROOT / "assets" / "dinalrm-tiny"
PROMPT = "a red circle"


@pytest.fixture
def repo(tmp_path):
    """A writable copy of the bundled tiny pipeline folder."""
    return shutil.copytree(BUNDLED, tmp_path / "tiny-repo")


def truncate(path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def test_truncated_model_weights_are_named(repo):
    weights = repo / "reward_model" / "model.safetensors"
    truncate(weights)
    with pytest.raises(OSError, match="truncated or damaged") as error:
        DiNaLRMModel.from_pretrained(repo / "reward_model")
    assert str(weights) in str(error.value)
    with pytest.raises(OSError, match="truncated or damaged") as error:
        DiNaLRMPipeline.from_pretrained(repo)
    assert str(weights) in str(error.value)


def test_pipeline_without_reward_model_config_is_refused_before_building_anything(repo, monkeypatch):
    (repo / "reward_model" / "config.json").unlink()
    built = []
    monkeypatch.setattr(DiNaLRMModel, "__init__", lambda self, config: built.append(config))
    with pytest.raises(ValueError, match="no reward_model/config.json"):
        DiNaLRMPipeline.from_pretrained(repo)
    with pytest.raises(FileNotFoundError, match="reward_model/config.json is missing"):
        DiNaLRMModel.from_pretrained(repo, subfolder="reward_model")
    assert built == []  # the full-size default model used to be built here (6.7 GB) before failing


@pytest.mark.parametrize("typo", ["./tiny-dinalrmm", "~/no-such-dinalrm-folder", "models/sub/tiny-dinalrm", "/nope/x"])
def test_a_mistyped_local_path_says_no_such_folder(typo):
    for load in (DiNaLRMPipeline.from_pretrained, DiNaLRMModel.from_pretrained):
        with pytest.raises(ModelUnavailableError, match="no such folder"):
            load(typo)


def test_cli_names_local_problems_as_local(repo, tmp_path, capsys):
    image = str(REPO_ROOT / "assets" / "examples" / "red-circle-left.png")
    assert cli.score_main(["--model", "./tiny-dinalrmm", "--prompt", PROMPT, image]) == 1
    error = capsys.readouterr().err
    assert "'./tiny-dinalrmm' does not exist: no such folder" in error
    assert "alphanumeric" not in error and "hf download" not in error

    (repo / "reward_model" / "config.json").unlink()
    assert cli.score_main(["--model", str(repo), "--prompt", PROMPT, image]) == 1
    error = capsys.readouterr().err
    assert "no reward_model/config.json" in error and "not a local folder" not in error.lower()
    assert "Traceback" not in error and "hf download" not in error

    (tmp_path / "empty").mkdir()
    assert cli.score_main(["--model", str(tmp_path / "empty"), "--prompt", PROMPT, image]) == 1
    assert "is neither a DiNa-LRM pipeline" in capsys.readouterr().err


def test_a_damaged_cached_conversion_is_converted_again(tmp_path, monkeypatch):
    import modeling_dinalrm

    monkeypatch.setenv("DINALRM_CACHE", str(tmp_path / "converted"))
    conversions = []
    convert = modeling_dinalrm.convert_official_checkpoint
    monkeypatch.setattr(
        modeling_dinalrm, "convert_official_checkpoint", lambda *a, **k: conversions.append(1) or convert(*a, **k)
    )
    load = lambda: modeling_dinalrm.load_official_checkpoint(OFFICIAL_TINY, OFFICIAL_TINY / "transformer")  # noqa: E731
    first = load()
    (cached,) = (tmp_path / "converted").glob("*/model.safetensors")
    truncate(cached)
    second = load()  # the damaged cache is rebuilt instead of failing every later load
    third = load()
    assert len(conversions) == 2
    for model in (second, third):
        for (name, a), b in zip(first.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), name
