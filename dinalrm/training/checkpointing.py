"""Checkpoints of a training run: atomic writes, exact resumes, EMA weights, and no pickles on disk.

A checkpoint is written under `.partial-checkpoint-<step>` and renamed to `checkpoint-<step>` only once complete,
so `list_checkpoints` (and `--resume_from_checkpoint latest`) never sees a half-written one. What accelerate
writes with `torch.save` is converted to safetensors before the rename and handed back to accelerate on resume.
Every checkpoint is read back and checked for NaN / infinite values before it is published (and before one is
resumed from), and `OutputDirLock` keeps a second run out of an output folder in use.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


logger = logging.getLogger(__name__)

__all__ = [
    "ACCELERATE_PICKLE_SUFFIXES",
    "CHECKPOINT_PREFIX",
    "LOCK_FILE",
    "PARTIAL_PREFIX",
    "TRAINING_STATE",
    "CheckpointError",
    "OutputDirLock",
    "convert_accelerate_pickles",
    "list_checkpoints",
    "load_checkpoint",
    "load_ema",
    "nonfinite_tensors",
    "register_checkpoint_hooks",
    "remove_old_checkpoints",
    "remove_partial_checkpoints",
    "check_output_dir_arguments",
    "prepare_output_dir",
    "read_training_state",
    "resolve_checkpoint",
    "resume_from",
    "restore_accelerate_pickles",
    "save_checkpoint",
    "save_ema",
    "verify_checkpoint",
]

CHECKPOINT_PREFIX = "checkpoint-"
PARTIAL_PREFIX = ".partial-"
TRAINING_STATE = "training_state.json"
LOCK_FILE = ".train.lock"
_CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
_EMA_WEIGHTS = "ema_weights.safetensors"
_EMA_STATE = "ema_state.json"


# Files at the top of --output_dir that a finished run leaves (the final model, LoRA, summary).
_FINAL_FILES = ("config.json", "training_summary.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: a file of it is unreadable or holds NaN or infinite values."""


def check_output_dir_arguments(args) -> None:
    """Refuses (ValueError naming the option and the fix) checkpointing arguments that would lose work, shared by
    `train_dinalrm.py` and `examples/lpo/train_lpo.py`: a `--checkpointing_steps` or `--checkpoints_total_limit`
    below 1 (a limit of 0 or less deletes every checkpoint, earlier runs' included), an `--output_dir` that is a
    file, and a new run (no `--resume_from_checkpoint`) in a folder holding another run's checkpoints or final
    model, unless `--overwrite_output_dir` says to replace them."""
    if args.checkpointing_steps < 1:
        raise ValueError(f"--checkpointing_steps must be at least 1, got {args.checkpointing_steps}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(
            f"--checkpoints_total_limit must be at least 1 (got {args.checkpoints_total_limit}): it is how many "
            "checkpoints to keep; leave it out to keep them all."
        )
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output_dir {args.output_dir} is a file, not a folder: choose a folder.")
    if args.resume_from_checkpoint or args.overwrite_output_dir:
        return
    earlier = [os.path.basename(path) for _, path in list_checkpoints(args.output_dir)]
    if os.path.isdir(args.output_dir):
        earlier += sorted(
            name
            for name in os.listdir(args.output_dir)
            if name in _FINAL_FILES or (name.endswith(".safetensors") and not name.startswith("."))
        )
    if earlier:
        raise ValueError(
            f"--output_dir {args.output_dir} holds another run ({', '.join(earlier[:4])}"
            f"{', ...' if len(earlier) > 4 else ''}): a new run would replace it. Pass --resume_from_checkpoint "
            "latest to continue that run, another --output_dir, or --overwrite_output_dir to replace it."
        )


def prepare_output_dir(output_dir: str | os.PathLike, resume_from_checkpoint: str | None, overwrite: bool) -> None:
    """Before a run writes anything (main process, under the folder's lock): removes what an interrupted checkpoint
    write left, and, for a new run with `--overwrite_output_dir`, the earlier run's checkpoints (so that a later
    `--resume_from_checkpoint latest` cannot pick one of them)."""
    remove_partial_checkpoints(output_dir)
    if overwrite and not resume_from_checkpoint:
        for _, path in list_checkpoints(output_dir):
            logger.warning(f"Removing {path} of an earlier run (--overwrite_output_dir)")
            shutil.rmtree(path)


def read_training_state(checkpoint: str | os.PathLike) -> dict:
    """The `training_state.json` of a checkpoint folder; raises `CheckpointError` naming the file when it is
    truncated, not an object, or its `global_step` is not the step of the folder's name (`checkpoint-<step>`)."""
    path = os.path.join(checkpoint, TRAINING_STATE)
    fix = "Resume from another checkpoint (--resume_from_checkpoint checkpoint-<step>) or start a new --output_dir."
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is damaged ({err}); it may be truncated. {fix}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a JSON {type(state).__name__}, not the training state object. {fix}")
    match = _CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(checkpoint)))
    step = state.get("global_step")
    if (
        isinstance(step, bool)
        or not isinstance(step, int)
        or step < 0
        or (match is not None and step != int(match.group(1)))
    ):
        expected = f"{int(match.group(1))}, the step in the folder's name" if match else "a step count >= 0"
        raise CheckpointError(f"{path} says global_step = {step!r}, expected {expected}. {fix}")
    for name in ("epoch", "batches_in_epoch"):
        value = state.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{path} says {name} = {value!r}, expected a count >= 0. {fix}")
    return state


# ----------------------------------------------------------------------------------------------- writing and reading
def _fsync_tree(path: str) -> None:
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())


def _publish_checkpoint(partial: str, final: str) -> None:
    """Rename the complete folder `partial` to `final` (replacing an older one) and make the rename durable.

    The one moment a checkpoint becomes visible; the crash tests' launcher (`tests/helpers/train_with_kill.py`)
    wraps it to kill the process just before or just after.
    """
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.rename(partial, final)
    directory = os.open(os.path.dirname(os.path.abspath(final)), os.O_RDONLY)
    os.fsync(directory)
    os.close(directory)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str,
    global_step: int,
    training_state: dict,
    total_limit: int | None = None,
) -> None:
    """`accelerator.save_state` into a temporary folder, renamed to `checkpoint-<step>` once complete.

    The main process converts accelerate's pickles, writes `training_state` as `training_state.json`, fsyncs
    everything and reads it back (`verify_checkpoint`) before the rename; with `total_limit`, the oldest complete
    checkpoints are removed only then. A checkpoint that fails the check is never published and nothing is
    removed: every process raises `CheckpointError`.
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{global_step}")
    partial = os.path.join(output_dir, f"{PARTIAL_PREFIX}{CHECKPOINT_PREFIX}{global_step}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    error = None
    if accelerator.is_main_process:
        convert_accelerate_pickles(partial)
        with open(os.path.join(partial, TRAINING_STATE), "w", encoding="utf-8") as handle:
            json.dump(training_state, handle, indent=2)
        _fsync_tree(partial)
        try:
            verify_checkpoint(partial)
        except ValueError as err:
            error = f"{err} It was not published (left in {partial}); the earlier checkpoints are kept."
        else:
            _publish_checkpoint(partial, final)
            logger.info(f"Saved {final}")
            if total_limit is not None:
                for removed in remove_old_checkpoints(output_dir, total_limit):
                    logger.info(f"Removed {removed} (--checkpoints_total_limit {total_limit})")
    error = broadcast_object_list([error])[0]
    if error is not None:
        raise CheckpointError(error)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, path: str | os.PathLike) -> dict:
    """Restore the state `save_checkpoint` wrote into `accelerator` and return its `training_state`.

    The checkpoint is first read back by the main process (`verify_checkpoint`): a truncated file or NaN / infinite
    values refuse the resume on every process, naming the checkpoint. accelerate's files are laid out in
    accelerate's own format in a temporary folder only, for `load_state`; a file missing from the checkpoint is
    reported under the checkpoint's name, not the temporary folder's.
    """
    error = None
    if accelerator.is_main_process:
        try:
            verify_checkpoint(path)
        except ValueError as err:
            error = str(err)
    error = broadcast_object_list([error])[0]
    if error is not None:
        raise CheckpointError(error)
    with tempfile.TemporaryDirectory(prefix="dinalrm-resume-") as state_dir:
        restore_accelerate_pickles(path, state_dir)
        try:
            accelerator.load_state(state_dir)
        except FileNotFoundError as err:
            missing = os.path.relpath(err.filename, state_dir) if err.filename else str(err)
            raise FileNotFoundError(
                f"The checkpoint {path} is incomplete: {missing} (or its `.safetensors` form) is missing. Resume "
                "from another checkpoint (--resume_from_checkpoint checkpoint-<step>) or start a new --output_dir."
            ) from err
    return read_training_state(path)


def nonfinite_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors among `named_tensors` that hold NaN or infinite values."""
    return [name for name, tensor in named_tensors if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Read back every safetensors file of a checkpoint folder: weights, EMA weights, optimizer and RNG states.

    Raises `CheckpointError` (a `ValueError`) naming the checkpoint and the file when one cannot be read
    (truncated, corrupt) or holds NaN or infinite values, so that such a checkpoint is neither resumed from nor
    published in place of a good one.
    """
    read_training_state(path)
    files = sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk(path)
        for name in names
        if name.endswith(".safetensors")
    )
    for file in files:
        relative = os.path.relpath(file, path)
        try:
            with safe_open(file, framework="pt") as handle:
                bad = nonfinite_tensors((key, handle.get_tensor(key)) for key in handle.keys())
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"The checkpoint {path} is damaged: {relative} cannot be read ({err}); it may be truncated. Resume "
                "from another checkpoint (--resume_from_checkpoint checkpoint-<step>) or start a new --output_dir."
            ) from err
        if bad:
            raise CheckpointError(
                f"The checkpoint {path} holds NaN or infinite values in {relative} ({', '.join(bad[:5])}"
                f"{', ...' if len(bad) > 5 else ''}). Resume from an earlier checkpoint "
                "(--resume_from_checkpoint checkpoint-<step>) or start a new --output_dir."
            )


def remove_partial_checkpoints(output_dir: str | os.PathLike) -> None:
    """Delete what a crash during a checkpoint write left behind (never a complete checkpoint)."""
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        if name.startswith(PARTIAL_PREFIX + CHECKPOINT_PREFIX):
            logger.warning(f"Removing the incomplete checkpoint {name} left by an interrupted run")
            shutil.rmtree(os.path.join(output_dir, name))


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """Complete checkpoints `(step, path)` in `output_dir`, oldest first.

    Checkpoints are written under a temporary name and renamed when complete, so a folder named
    `checkpoint-<step>` holding its `training_state.json` is complete; anything else is ignored.
    """
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, TRAINING_STATE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_checkpoint(output_dir: str | os.PathLike, spec: str) -> str | None:
    """The folder `--resume_from_checkpoint` names: `latest` (None when there is none yet) or a path/name."""
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = spec if os.path.isdir(spec) else os.path.join(output_dir, spec)
    if not os.path.isfile(os.path.join(path, TRAINING_STATE)):
        raise FileNotFoundError(f"{spec!r} is not a complete checkpoint folder (no {TRAINING_STATE} in {path}).")
    return path


def resume_from(accelerator: Accelerator, output_dir: str | os.PathLike, spec: str | None) -> dict | None:
    """Restore the checkpoint `--resume_from_checkpoint spec` names and return its training state (None: start anew).

    `latest` with no complete checkpoint yet starts a new run (logged); any other name must be a complete checkpoint.
    """
    if not spec:
        return None
    path = resolve_checkpoint(output_dir, spec)
    if path is None:
        logger.info("No complete checkpoint to resume from: starting a new run.")
        return None
    logger.info(f"Resuming from checkpoint {path}")
    return load_checkpoint(accelerator, path)


def remove_old_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[str]:
    """Delete the oldest complete checkpoints so that at most `keep` remain; returns the removed paths."""
    checkpoints = list_checkpoints(output_dir)
    removed = [path for _, path in checkpoints[: max(0, len(checkpoints) - keep)]]
    for path in removed:
        shutil.rmtree(path)
    return removed


def save_ema(ema: EMAModel, names: Sequence[str], directory: str | os.PathLike) -> None:
    """EMA weights as safetensors keyed by parameter name, plus its counters as JSON (exactly restorable)."""
    os.makedirs(directory, exist_ok=True)
    save_file(
        {name: shadow.detach().contiguous() for name, shadow in zip(names, ema.shadow_params)},
        os.path.join(directory, _EMA_WEIGHTS),
    )
    counters = {key: value for key, value in ema.state_dict().items() if key != "shadow_params"}
    with open(os.path.join(directory, _EMA_STATE), "w", encoding="utf-8") as handle:
        json.dump(counters, handle, indent=2)


def load_ema(ema: EMAModel, names: Sequence[str], directory: str | os.PathLike) -> None:
    """Restore what `save_ema` wrote; the parameter names must match the ones being averaged."""
    weights = load_file(os.path.join(directory, _EMA_WEIGHTS))
    if set(weights) != set(names):
        missing, unexpected = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
        raise ValueError(
            f"EMA weights do not match the trainable parameters: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    with open(os.path.join(directory, _EMA_STATE), encoding="utf-8") as handle:
        counters = json.load(handle)
    device = ema.shadow_params[0].device if ema.shadow_params else "cpu"
    ema.load_state_dict({**counters, "shadow_params": [weights[name].to(device) for name in names]})


def register_checkpoint_hooks(
    accelerator: Accelerator,
    save_model: Callable[[torch.nn.Module, str], None],
    load_model: Callable[[torch.nn.Module, str], None],
    ema: EMAModel | None = None,
    ema_names: Sequence[str] = (),
) -> None:
    """Make `accelerator.save_state` / `load_state` keep the model the script's way, plus the EMA weights.

    `save_model(model, folder)` writes the (unwrapped) model in its own format instead of accelerate's full weights
    (a reward model folder, a LoRA file); `load_model(model, folder)` reads it back into the model. With `ema`, its
    weights (keyed by `ema_names`) go to `<folder>/ema` through `save_ema` / `load_ema`.
    """

    def save_hook(models, weights, output_dir):
        for model in models:
            if accelerator.is_main_process:
                save_model(accelerator.unwrap_model(model), output_dir)
            weights.pop()
        if ema is not None and accelerator.is_main_process:
            save_ema(ema, ema_names, os.path.join(output_dir, "ema"))

    def load_hook(models, input_dir):
        while models:
            load_model(accelerator.unwrap_model(models.pop()), input_dir)
        if ema is not None:
            load_ema(ema, ema_names, os.path.join(input_dir, "ema"))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ----------------------------------------------------------------------------- accelerate's state without pickles
#: Files that `accelerator.save_state` writes with `torch.save` (optimizer, LR scheduler, sampler, grad scaler,
#: RNG states, registered objects); checkpoints keep them as safetensors instead, so that a checkpoint, which may
#: come from elsewhere, never has to be unpickled.
ACCELERATE_PICKLE_SUFFIXES = (".bin", ".pkl", ".pt")
_STATE_TREE = "dinalrm_state_tree"
_STATE_SOURCE = "dinalrm_state_source"
#: The names `accelerator.save_state` gives the files it pickles (see accelerate's `checkpointing` module).
_ACCELERATE_STATE_NAME = re.compile(
    r"(?:(?:optimizer|scheduler|sampler|dl_state_dict|pytorch_model)(?:_\d+)?\.bin"
    r"|random_states_\d+\.pkl|custom_checkpoint_\d+\.pkl|scaler\.pt)"
)


def _state_to_tree(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able description of a state object; its tensors and arrays go into `tensors`."""
    if isinstance(value, torch.Tensor):
        tensors[str(len(tensors))] = value.detach().cpu().contiguous()
        return {"tensor": str(len(tensors) - 1)}
    if isinstance(value, np.ndarray):
        wide = value.astype(np.float64 if value.dtype.kind == "f" else np.int64)
        tensors[str(len(tensors))] = torch.from_numpy(np.ascontiguousarray(wide))
        return {"ndarray": str(len(tensors) - 1), "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {"dict": [[_state_to_tree(k, tensors), _state_to_tree(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_state_to_tree(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_state_to_tree(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} from accelerate's checkpoint state without pickle")


def _tree_to_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `_state_to_tree`."""
    if isinstance(tree, list):
        return [_tree_to_state(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "tensor" in tree:
        return tensors[tree["tensor"]]
    if "ndarray" in tree:
        return tensors[tree["ndarray"]].numpy().astype(np.dtype(tree["dtype"]))
    if "tuple" in tree:
        return tuple(_tree_to_state(v, tensors) for v in tree["tuple"])
    return {_tree_to_state(k, tensors): _tree_to_state(v, tensors) for k, v in tree["dict"]}


def convert_accelerate_pickles(checkpoint_dir: str | os.PathLike) -> list[str]:
    """Replace the pickles `accelerator.save_state` wrote in `checkpoint_dir` by safetensors; returns their names.

    Each `<name>` becomes `<name>.safetensors` holding the tensors, with the structure (dict keys, tuples,
    numbers) as JSON in the metadata; `restore_accelerate_pickles` gives accelerate its files back on resume.
    """
    from accelerate.utils import load

    converted = []
    for name in sorted(os.listdir(checkpoint_dir)):
        path = os.path.join(checkpoint_dir, name)
        if not (os.path.isfile(path) and name.endswith(ACCELERATE_PICKLE_SUFFIXES)):
            continue
        tensors: dict[str, torch.Tensor] = {}
        tree = _state_to_tree(load(path, map_location="cpu"), tensors)
        save_file(tensors, f"{path}.safetensors", metadata={_STATE_TREE: json.dumps(tree), _STATE_SOURCE: name})
        os.remove(path)
        converted.append(name)
    return converted


def restore_accelerate_pickles(checkpoint_dir: str | os.PathLike, work_dir: str | os.PathLike) -> None:
    """Lay out `checkpoint_dir` in `work_dir` as `accelerator.load_state` expects it.

    Entries are symlinked; files converted by `convert_accelerate_pickles` are written back in accelerate's
    format, in `work_dir` only (a temporary folder), so the checkpoint itself stays pickle-free. The file each
    one restores must be accelerate's own name (`optimizer.bin`, `random_states_0.pkl`, ...) and the name of the
    safetensors file without its suffix: a checkpoint, which may come from elsewhere, never decides where we write.
    """
    for name in os.listdir(checkpoint_dir):
        path = os.path.join(checkpoint_dir, name)
        metadata = None
        if name.endswith(".safetensors") and os.path.isfile(path):
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
        if metadata and _STATE_TREE in metadata:
            source = metadata.get(_STATE_SOURCE)
            if source != name.removesuffix(".safetensors") or not _ACCELERATE_STATE_NAME.fullmatch(source):
                raise ValueError(
                    f"{path} names {source!r} as the accelerate state file it restores; only accelerate's own "
                    f"file names, matching its own name without `.safetensors`, are written. The checkpoint was not "
                    "written by train_dinalrm.py: do not resume from it."
                )
            tensors = load_file(path)
            state = _tree_to_state(json.loads(metadata[_STATE_TREE]), tensors)
            torch.save(state, os.path.join(work_dir, source))
        else:
            os.symlink(os.path.abspath(path), os.path.join(work_dir, name))


# ----------------------------------------------------------------------------------------- one run per output folder
class OutputDirLock:
    """An exclusive lock on a training output folder, so that two runs never write (and rotate) the same checkpoints.

    It is an `fcntl.flock` on `<output_dir>/.train.lock`, which records the holder's process id and host. The kernel
    drops the lock when its process dies, however it dies: a lock file left behind by a killed run is reported as
    stale and taken over, while a live run's lock refuses the second run with a `RuntimeError` naming that process.

    Args:
        output_dir (`str` or `os.PathLike`): the folder to lock (created if missing).
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = os.fspath(output_dir)
        self.path = os.path.join(self.output_dir, LOCK_FILE)
        self._handle = None

    def acquire(self) -> OutputDirLock:
        """Take the lock, or raise `RuntimeError` if another live process holds it."""
        os.makedirs(self.output_dir, exist_ok=True)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "an unknown process"
                handle.close()
                raise RuntimeError(
                    f"{self.output_dir} is in use by another training run ({holder}): a second run would delete its "
                    "checkpoints. Wait for it or stop that process, or pass another --output_dir."
                ) from None
            if os.path.exists(self.path) and os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path)):
                break
            handle.close()  # the holder released and removed the file between our open and our lock: retry
        handle.seek(0)
        stale = handle.read().strip()
        if stale:
            logger.warning(
                f"{self.path} was left by a run that is no longer alive ({stale}); taking the output folder over."
            )
        handle.truncate(0)
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held)."""
        if self._handle is None:
            return
        os.remove(self.path)
        self._handle.close()
        self._handle = None

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
