"""Error inputs of training: the arguments of `train_dinalrm.py` and `examples/lpo/train_lpo.py` (numbers that would
delete checkpoints, output folders holding another run, local paths that do not exist), data rows (counted skips),
and the resume state (`training_state.json`)."""

import importlib.util
import json
from pathlib import Path

import PIL.Image
import pytest
from conftest import REPO_ROOT
from error_inputs import ErrorInput, SkipInput, assert_message, rows

from dinalrm.data import load_preference_dataset
from dinalrm.training.checkpointing import CheckpointError, read_training_state, verify_checkpoint


def load_script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPTS = {
    "train_dinalrm": (
        REPO_ROOT / "train_dinalrm.py",
        ["--pretrained_model_name_or_path", "org/base", "--dataset_name", "d"],
    ),
    "train_lpo": (
        REPO_ROOT / "examples" / "lpo" / "train_lpo.py",
        ["--pretrained_model_name_or_path", "org/base", "--reward_model", "org/rm", "--prompts_file", "p.txt"],
    ),
}


def earlier_run(folder: Path, checkpoint: bool = True) -> None:
    """What a finished run leaves: a complete checkpoint and the final model."""
    if checkpoint:
        (folder / "checkpoint-10").mkdir(parents=True)
        (folder / "checkpoint-10" / "training_state.json").write_text(json.dumps({"global_step": 10}))
    else:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")


def with_output(*flags, setup=None):
    def build(tmp_path: Path) -> list[str]:
        output = tmp_path / "run"
        if setup is not None:
            setup(output)
        return ["--output_dir", str(output), *flags]

    return build


ARGUMENT_ERROR_INPUTS = [
    ErrorInput(
        "checkpoints_total_limit -1",
        with_output("--checkpoints_total_limit", "-1"),
        SystemExit,
        "--checkpoints_total_limit must be at least 1",
    ),
    ErrorInput(
        "checkpoints_total_limit 0",
        with_output("--checkpoints_total_limit", "0"),
        SystemExit,
        "--checkpoints_total_limit must be at least 1",
    ),
    ErrorInput(
        "checkpointing_steps 0",
        with_output("--checkpointing_steps", "0"),
        SystemExit,
        "--checkpointing_steps must be at least 1",
    ),
    ErrorInput(
        "checkpointing_steps -5",
        with_output("--checkpointing_steps", "-5"),
        SystemExit,
        "--checkpointing_steps must be at least 1",
    ),
    ErrorInput(
        "output_dir is a file",
        lambda t: (t / "file.txt").write_text("mine") and ["--output_dir", str(t / "file.txt")],
        SystemExit,
        "is a file, not a folder",
    ),
    ErrorInput(
        "new run over another run's checkpoints",
        with_output("--seed", "7", setup=earlier_run),
        SystemExit,
        r"holds another run \(checkpoint-10\).*--resume_from_checkpoint.*--overwrite_output_dir",
    ),
    ErrorInput(
        "new run over another run's final model",
        with_output(setup=lambda f: earlier_run(f, checkpoint=False)),
        SystemExit,
        r"holds another run \(config.json\)",
    ),
    ErrorInput(
        "base model: a local path that does not exist",
        lambda t: ["--output_dir", str(t / "run"), "--pretrained_model_name_or_path", str(t / "no" / "such" / "base")],
        SystemExit,
        "base model .* does not exist: no such folder",
    ),
    ErrorInput(
        "base model: a relative path that does not exist",
        lambda t: ["--output_dir", str(t / "run"), "--pretrained_model_name_or_path", "./no-such-base"],
        SystemExit,
        "does not exist: no such folder",
    ),
]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("row", rows(ARGUMENT_ERROR_INPUTS))
def test_training_argument_error_inputs(row, script, tmp_path, capsys):
    path, required = SCRIPTS[script]
    module = load_script(script, path)
    argv = row.input(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(row.error) as raised:
        module.parse_args([*required, *argv])
    assert raised.value.code == 2
    assert_message(row, capsys.readouterr().err.replace("\n", " "))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("flags", [["--resume_from_checkpoint", "latest"], ["--overwrite_output_dir"]])
def test_an_earlier_run_is_resumed_or_replaced_only_when_asked(script, flags, tmp_path):
    path, required = SCRIPTS[script]
    earlier_run(tmp_path / "run")
    args = load_script(script, path).parse_args([*required, "--output_dir", str(tmp_path / "run"), *flags])
    assert args.output_dir == str(tmp_path / "run")


def test_overwrite_output_dir_removes_the_earlier_checkpoints_before_the_new_run(tmp_path):
    from dinalrm.training.checkpointing import list_checkpoints, prepare_output_dir

    earlier_run(tmp_path)
    prepare_output_dir(tmp_path, None, overwrite=False)
    assert len(list_checkpoints(tmp_path)) == 1
    prepare_output_dir(tmp_path, "latest", overwrite=True)  # resuming keeps them
    assert len(list_checkpoints(tmp_path)) == 1
    prepare_output_dir(tmp_path, None, overwrite=True)
    assert list_checkpoints(tmp_path) == []


# ------------------------------------------------------------------------------------------ resume state
def state_file(text: str):
    def build(tmp_path: Path) -> Path:
        checkpoint = tmp_path / "checkpoint-20"
        checkpoint.mkdir()
        (checkpoint / "training_state.json").write_text(text)
        return checkpoint

    return build


def state(**values):
    return state_file(json.dumps({"global_step": 20, "epoch": 1, "batches_in_epoch": 3} | values))


RESUME_STATE_ERROR_INPUTS = [
    ErrorInput(
        "global_step -5",
        state(global_step=-5),
        CheckpointError,
        r"training_state.json says global_step = -5, expected 20",
    ),
    ErrorInput(
        "global_step 10**12", state(global_step=10**12), CheckpointError, "global_step = 1000000000000, expected 20"
    ),
    ErrorInput("global_step 2.5", state(global_step=2.5), CheckpointError, "global_step = 2.5"),
    ErrorInput("global_step a string", state(global_step="20"), CheckpointError, "global_step = '20'"),
    ErrorInput("global_step true", state(global_step=True), CheckpointError, "global_step = True"),
    ErrorInput("global_step missing", state_file('{"epoch": 1}'), CheckpointError, "global_step = None"),
    ErrorInput("epoch -1", state(epoch=-1), CheckpointError, "epoch = -1"),
    ErrorInput("batches_in_epoch a list", state(batches_in_epoch=[1]), CheckpointError, r"batches_in_epoch = \[1\]"),
    ErrorInput(
        "truncated", state_file('{"global_step": 2'), CheckpointError, r"checkpoint-20/training_state.json is damaged"
    ),
    ErrorInput("empty", state_file(""), CheckpointError, "training_state.json is damaged"),
    ErrorInput("a JSON list", state_file("[20]"), CheckpointError, "holds a JSON list"),
    ErrorInput("NaN step", state_file('{"global_step": NaN}'), CheckpointError, "global_step = nan"),
]


@pytest.mark.parametrize("row", rows(RESUME_STATE_ERROR_INPUTS))
def test_resume_state_error_inputs(row, tmp_path):
    checkpoint = row.input(tmp_path)
    for check in (read_training_state, verify_checkpoint):  # verify_checkpoint runs before every resume
        with pytest.raises(row.error) as raised:
            check(checkpoint)
        assert_message(row, str(raised.value))
        assert "--resume_from_checkpoint" in str(raised.value)


def test_a_consistent_state_reads_back(tmp_path):
    assert read_training_state(state()(tmp_path)) == {"global_step": 20, "epoch": 1, "batches_in_epoch": 3}


# ------------------------------------------------------------------------------------------ data rows
def dataset(rows_: list[dict], tmp_path: Path) -> Path:
    folder = tmp_path / "pairs"
    folder.mkdir()
    for name, color in (("a.png", "red"), ("b.png", "blue")):
        PIL.Image.new("RGB", (32, 32), color).save(folder / name)
    PIL.Image.new("RGB", (32, 32), "green").save(tmp_path / "outside.png")
    good = {"prompt": "a red square", "chosen": "a.png", "rejected": "b.png", "weight": 0.5}
    (folder / "train.json").write_text(json.dumps([good, *rows_]))
    return folder


DATA_ROW_SKIP_INPUTS = [
    SkipInput("weight NaN", {"weight": float("nan")}, "invalid_weight"),
    SkipInput("weight Infinity", {"weight": float("inf")}, "invalid_weight"),
    SkipInput("weight -Infinity", {"weight": float("-inf")}, "invalid_weight"),
    SkipInput("weight negative", {"weight": -1.0}, "invalid_weight"),
    SkipInput("weight null", {"weight": None}, "invalid_weight"),
    SkipInput("absolute path outside the root", {"chosen": "{outside}"}, "path_outside_root"),
    SkipInput("relative path outside the root", {"rejected": "../outside.png"}, "path_outside_root"),
    SkipInput("empty prompt", {"prompt": " "}, "empty_prompt"),
]


@pytest.mark.parametrize("row", rows(DATA_ROW_SKIP_INPUTS))
def test_data_row_skip_inputs(row, tmp_path, caplog):
    bad = {"prompt": "a blue square", "chosen": "a.png", "rejected": "b.png", "weight": 1.0}
    bad |= {
        key: value.format(outside=tmp_path / "outside.png") if isinstance(value, str) else value
        for key, value in row.input.items()
    }
    folder = dataset([bad], tmp_path)
    with caplog.at_level("WARNING"):
        ds, stats = load_preference_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    assert ds["prompt"] == ["a red square"] and ds["weight"] == [0.5]
    assert dict(stats.skipped) == {row.reason: 1}
    assert f"{row.reason}=1" in caplog.text


def test_absolute_paths_inside_the_root_are_kept(tmp_path):
    folder = tmp_path / "pairs"
    row = {"prompt": "a blue square", "chosen": str(folder / "a.png"), "rejected": "b.png", "weight": 1.0}
    folder = dataset([row], tmp_path)
    ds, stats = load_preference_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 2 and stats.n_skipped == 0
