"""Training under faults and hostile input (issue 14): checkpoints with non-finite weights, truncated or missing files,
crafted metadata or another model's settings; damaged feature caches; the non-finite step guard; a second run on the
same output folder. The whole training run that stops on a non-finite loss is in `tests/test_train.py`."""

import argparse
import json
import multiprocessing
import os
import time

import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file, save_file
from test_train import train

from dinalrm.data import load_preference_dataset, write_canonical_pairs
from dinalrm.testing import get_tiny_dinalrm_reward_model
from dinalrm.training.buckets import BucketSet
from dinalrm.training.checkpointing import (
    LOCK_FILE,
    PARTIAL_PREFIX,
    CheckpointError,
    OutputDirLock,
    list_checkpoints,
    load_checkpoint,
    restore_accelerate_pickles,
    save_checkpoint,
)
from dinalrm.training.feature_cache import CachedPairDataset, read_cache_info, write_feature_cache
from train_dinalrm import check_update, load_checkpoint_model


@pytest.fixture
def trained(tmp_path):
    """An accelerator preparing a small model and its optimizer, one optimizer step taken."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return accelerator, model, tmp_path / "run"


def _poison(model: torch.nn.Module) -> None:
    with torch.no_grad():
        model.weight[0, 0] = float("nan")


def test_rotation_keeps_the_last_good_checkpoint_when_the_new_one_is_not_finite(trained):
    accelerator, model, output = trained
    save_checkpoint(accelerator, str(output), 1, {"global_step": 1}, total_limit=1)
    good = load_file(output / "checkpoint-1" / "model.safetensors")
    _poison(model)
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in model\.safetensors \(weight\)"):
        save_checkpoint(accelerator, str(output), 2, {"global_step": 2}, total_limit=1)
    assert [step for step, _ in list_checkpoints(output)] == [1]
    kept = load_file(output / "checkpoint-1" / "model.safetensors")
    # Exact: the good checkpoint is kept as written, not rewritten.
    assert all(torch.equal(kept[k], good[k]) for k in good)
    assert (output / f"{PARTIAL_PREFIX}checkpoint-2").is_dir()  # never published, so `latest` cannot pick it


def test_resuming_from_a_non_finite_or_truncated_checkpoint_is_refused_by_name(trained):
    accelerator, _, output = trained
    save_checkpoint(accelerator, str(output), 1, {"global_step": 1})
    checkpoint, weights = output / "checkpoint-1", output / "checkpoint-1" / "model.safetensors"
    tensors = load_file(weights)
    tensors["bias"][1] = float("inf")
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=rf"{checkpoint} holds NaN or infinite values in model\.safetensors"):
        load_checkpoint(accelerator, checkpoint)

    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{checkpoint} is damaged: model\.safetensors cannot be read"):
        load_checkpoint(accelerator, checkpoint)


def test_a_missing_file_is_reported_under_the_checkpoint_name(trained):
    accelerator, _, output = trained
    save_checkpoint(accelerator, str(output), 1, {"global_step": 1})
    (output / "checkpoint-1" / "optimizer.bin.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_checkpoint(accelerator, output / "checkpoint-1")
    message = str(error.value)
    assert f"{output / 'checkpoint-1'} is incomplete: optimizer.bin" in message and "dinalrm-resume-" not in message


@pytest.mark.parametrize("source", ["../escaped.bin", "/tmp/dinalrm-escaped.bin", "notes.txt", "scheduler.bin"])
def test_state_metadata_never_decides_where_we_write(tmp_path, source):
    """A crafted `dinalrm_state_source` (another path, another name) is refused; nothing is written."""
    checkpoint, work = tmp_path / "checkpoint", tmp_path / "work" / "state"
    checkpoint.mkdir()
    work.mkdir(parents=True)
    save_file(
        {"0": torch.zeros(1)},
        checkpoint / "optimizer.bin.safetensors",
        metadata={"dinalrm_state_tree": json.dumps({"tensor": "0"}), "dinalrm_state_source": source},
    )
    with pytest.raises(ValueError, match="only accelerate's own file names"):
        restore_accelerate_pickles(checkpoint, work)
    assert not (tmp_path / "work" / "escaped.bin").exists() and not os.path.exists("/tmp/dinalrm-escaped.bin")
    assert os.listdir(work) == []


def test_a_checkpoint_of_another_lora_rank_or_without_config_is_refused(tmp_path):
    saved = get_tiny_dinalrm_reward_model(lora_rank=4)
    saved.save_pretrained(tmp_path / "checkpoint-2" / "reward_model", merge_lora=False)
    with pytest.raises(ValueError, match=r"other model settings \{'lora_rank': \(4, 8\)"):
        load_checkpoint_model(
            str(tmp_path / "checkpoint-2" / "reward_model"), get_tiny_dinalrm_reward_model(lora_rank=8)
        )
    (tmp_path / "checkpoint-2" / "reward_model" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'checkpoint-2'} is incomplete: .* has no config.json"):
        load_checkpoint_model(str(tmp_path / "checkpoint-2" / "reward_model"), saved)


def _hold_lock(output_dir, ready) -> None:
    """A first training run, in a forked process: takes the lock on `output_dir`, says so, and waits to be killed."""
    lock = OutputDirLock(output_dir).acquire()
    ready.send("locked")
    time.sleep(600)
    lock.release()


def test_a_second_run_on_a_locked_output_dir_is_refused_and_a_stale_lock_is_reported(tmp_path, caplog):
    output = tmp_path / "run"
    partial = output / f"{PARTIAL_PREFIX}checkpoint-4"
    partial.mkdir(parents=True)  # the first run's in-progress checkpoint
    (tmp_path / "empty-model").mkdir()  # a folder: the lock is met before the model is read
    # The holder is forked from this interpreter (no second start of torch); the refused run is the script's `main`
    # in this process (test_train.py's `train`), so the two runs are two processes.
    fork = multiprocessing.get_context("fork")
    ready, ready_child = fork.Pipe(duplex=False)
    holder = fork.Process(target=_hold_lock, args=(output, ready_child), daemon=True)
    holder.start()
    ready_child.close()  # the child holds its own end
    try:
        assert ready.poll(120) and ready.recv() == "locked"
        with pytest.raises(RuntimeError) as refused:
            train(
                "--pretrained_model_name_or_path",
                str(tmp_path / "empty-model"),
                "--train_data_dir",
                str(tmp_path / "no-data"),
                "--output_dir",
                str(output),
            )
        assert f'is in use by another training run ({{"pid": {holder.pid}' in str(refused.value)
        assert partial.is_dir(), "the second run deleted the first run's in-progress checkpoint"
        with pytest.raises(RuntimeError, match="in use by another training run"):
            OutputDirLock(output).acquire()
    finally:
        holder.kill()  # SIGKILL: a killed run cannot release its lock file
        holder.join()

    assert (output / LOCK_FILE).is_file()  # a killed run cannot clean up: its lock file stays, the lock does not
    with caplog.at_level("WARNING"), OutputDirLock(output) as lock:
        assert json.loads((output / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert lock.path == str(output / LOCK_FILE)
    assert f'no longer alive ({{"pid": {holder.pid}' in caplog.text
    assert not (output / LOCK_FILE).exists()  # released on exit


def _cache(tmp_path, damage) -> str:
    """A feature cache of 4 pairs (2 prompt shards, 2 pair shards), with its cache_info.json, damaged by `damage`."""
    images = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(8)]
    rows = [{"prompt": f"prompt {i}", "chosen": images[2 * i], "rejected": images[2 * i + 1]} for i in range(4)]
    write_canonical_pairs(tmp_path / "data", rows)
    pairs, _ = load_preference_dataset(train_data_dir=str(tmp_path / "data"), buckets=BucketSet(32, 8))
    cache = tmp_path / "cache"
    write_feature_cache(
        cache,
        "train",
        pairs,
        lambda prompts: (torch.zeros(len(prompts), 4, 32), torch.zeros(len(prompts), 32)),
        lambda batch: torch.zeros(len(batch), 16, 8, 8),
        batch_size=2,
        shard_size=2,
    )
    (cache / "cache_info.json").write_text(
        json.dumps({"fingerprint": {}, "splits": ["train"], "skipped": {"train": {"kept": 4, "skipped": 0}}})
    )
    damage(cache)
    return str(cache)


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda cache: None, None),
        (
            lambda cache: _truncate(cache / "train" / "pairs-000001-32x32.safetensors"),
            "pairs-000001-32x32.safetensors cannot be read",
        ),
        (
            lambda cache: _truncate(cache / "train" / "prompts-000000.safetensors"),
            "prompts-000000.safetensors cannot be read",
        ),
        (
            lambda cache: (cache / "train" / "pairs-000000-32x32.safetensors").unlink(),
            "holds 2 pairs where 4 were cached",
        ),
        (lambda cache: (cache / "train" / "prompts-000000.safetensors").unlink(), "prompt shards .* are missing"),
        (lambda cache: (cache / "train" / "prompts-000001.safetensors").unlink(), "prompt shards .* are missing"),
        (
            lambda cache: (cache / "cache_info.json").write_text('{"fingerprint": {'),
            "cache_info.json is not valid JSON",
        ),
        (lambda cache: (cache / "cache_info.json").write_text("[]"), "cache_info.json lacks"),
    ],
)
def test_a_damaged_feature_cache_is_refused_naming_the_problem(tmp_path, damage, problem):
    cache = _cache(tmp_path, damage)
    if problem is None:
        assert len(CachedPairDataset(cache, "train")) == 4 and read_cache_info(cache)["splits"] == ["train"]
        return
    with pytest.raises(ValueError, match=rf"feature cache in {cache} is damaged: .*{problem}.*--precompute_features"):
        read_cache_info(cache)
        CachedPairDataset(cache, "train")


def _update_check(tmp_path, loss: float, grad: float, skip: bool) -> bool:
    accelerator = Accelerator(cpu=True)
    parameter = torch.nn.Parameter(torch.ones(2))
    parameter.grad = torch.tensor([grad, 0.0])
    args = argparse.Namespace(max_grad_norm=1.0, skip_nonfinite_steps=skip, output_dir=str(tmp_path))
    return check_update(accelerator, args, [parameter], torch.isfinite(torch.tensor(loss)), step=7)


def test_the_step_guard_stops_on_a_non_finite_loss_or_gradient_or_skips_under_the_option(tmp_path, caplog):
    assert _update_check(tmp_path, loss=0.5, grad=3.0, skip=False)
    with pytest.raises(FloatingPointError, match="Non-finite loss at step 7.*no checkpoint was written"):
        _update_check(tmp_path, loss=float("nan"), grad=3.0, skip=False)
    with pytest.raises(FloatingPointError, match="Non-finite gradient at step 7.*--skip_nonfinite_steps"):
        _update_check(tmp_path, loss=0.5, grad=float("inf"), skip=False)
    with caplog.at_level("WARNING"):
        assert not _update_check(tmp_path, loss=float("nan"), grad=3.0, skip=True)
    assert "Non-finite loss at step 7: step skipped" in caplog.text
