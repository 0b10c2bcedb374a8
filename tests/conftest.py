"""Shared fixtures: the official-tiny parity data and its conversion through the public converter script."""

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import tolerances
import torch
from safetensors.torch import load_file


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO_ROOT = Path(__file__).resolve().parents[1]
# The parity fixtures can be swapped for another fixture made the same way (another official run, or a copy cut to a
# smaller batch by tests/test_fixture_independence.py): every parity test reads its sizes and settings from them.
OFFICIAL_TINY = Path(os.environ.get("DINALRM_OFFICIAL_TINY") or REPO_ROOT / "tests" / "fixtures" / "official-tiny")
OFFICIAL_LRM_TINY = Path(
    os.environ.get("DINALRM_OFFICIAL_LRM_TINY") or REPO_ROOT / "tests" / "fixtures" / "official-lrm-tiny"
)
# DINALRM_TEST_THREADS=N runs every test with N torch threads (CI's second pass uses 1, with other CPU kernels).
# Otherwise each xdist worker takes its share of the cores, and so do the interpreters its tests start (through
# OMP_NUM_THREADS): two workers of two threads each on two cores spend their time waiting for each other's threads.
_worker_count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
_test_threads = os.environ.get("DINALRM_TEST_THREADS") or (
    str(max(1, (os.cpu_count() or 1) // _worker_count)) if _worker_count else None
)
_default_threads = torch.get_num_threads()
if _test_threads:
    torch.set_num_threads(int(_test_threads))
    os.environ.setdefault("OMP_NUM_THREADS", _test_threads)


@pytest.fixture(autouse=True)
def numeric_tests_keep_the_default_threads(request):
    """Without DINALRM_TEST_THREADS, the numeric tests run on torch's default thread count even under xdist, so that
    CI's second pass (one thread) sums in another order than the first."""
    if os.environ.get("DINALRM_TEST_THREADS") or request.node.get_closest_marker("numeric") is None:
        yield
        return
    from dinalrm.testing import torch_threads

    with torch_threads(_default_threads):
        yield


# The only sys.path edit of the repository: the package is installed (`pip install -e .`), but tests also import the
# example and benchmark folders' modules (examples/tiny_world/domain.py, benchmarks/bench_model.py, ...) as a script
# run there would see them.
for folder in (REPO_ROOT, *(REPO_ROOT / f for f in ("examples/tiny_world", "examples/refl", "benchmarks"))):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


# The numeric tests (float comparisons with the official code, between paths, batches and processes): CI runs them a
# second time with ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 DINALRM_TEST_THREADS=1 (`-m numeric`, .ci/run).
NUMERIC_FILES = frozenset(
    f"test_{name}.py"
    for name in (
        "parity_official", "official_configs", "converter", "lrm_parity", "lpo_parity", "lrm", "lpo", "model",
        "pipeline", "serve", "rewards", "flow_sde", "batch_scoring", "alignment", "reward_stats",
    )
)  # fmt: skip


# What each test file cost in a recent full run (worker seconds), so that xdist hands out the longest files first
# (`--dist loadfile --no-loadscope-reorder` in pyproject.toml): a long file started last keeps one core busy while the
# other idles. Only the order of the run depends on it. Refresh it after changing the suite's costs:
# `HF_HUB_OFFLINE=1 python -m pytest -q --record-file-durations`.
FILE_DURATIONS = Path(__file__).with_name("file_durations.json")


def pytest_addoption(parser):
    parser.addoption(
        "--record-file-durations",
        action="store_true",
        help=f"write each test file's total duration to {FILE_DURATIONS.name} (the order of later runs)",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in NUMERIC_FILES:
            item.add_marker(pytest.mark.numeric)
    costs = json.loads(FILE_DURATIONS.read_text()) if FILE_DURATIONS.exists() else {}
    items.sort(key=lambda item: -costs.get(item.path.name, 0.0))  # stable: a file's tests keep their order


class FileDurationRecorder:
    """Sums setup, call and teardown time per test file (in the xdist controller, which sees every report)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report):
        name = Path(report.location[0]).name
        self.seconds[name] = self.seconds.get(name, 0.0) + report.duration

    def pytest_sessionfinish(self, session, exitstatus):
        if exitstatus == pytest.ExitCode.INTERRUPTED:  # partial sums would put the files that ran too early
            return
        # Files this run did not reach keep their recorded cost, so a run of a few files updates just those.
        recorded = json.loads(FILE_DURATIONS.read_text()) if FILE_DURATIONS.exists() else {}
        recorded.update((name, round(seconds, 1)) for name, seconds in self.seconds.items())
        FILE_DURATIONS.write_text(json.dumps(dict(sorted(recorded.items(), key=lambda kv: -kv[1])), indent=1) + "\n")


def pytest_configure(config):
    if config.getoption("record_file_durations") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(FileDurationRecorder(), "dinalrm-file-durations")


# Starting Python afresh costs ~10 CPU seconds of imports (torch alone ~4 s), and ~25 tests start command lines.
# Those whose subject is the command line, not a new interpreter, start it with the `warm_python` fixture: a
# stand-in for `python` whose command lines run as forks of one interpreter per xdist worker that imported torch,
# NumPy, SciPy, pandas and pyarrow once (dinalrm.testing.warm_python). Our code, diffusers, transformers and
# huggingface_hub are imported afresh in each fork, so a command may set the Hub variables its own way; a command
# with another environment otherwise (or other interpreter options) runs in a fresh interpreter, as typed.
# DINALRM_WARM_PYTHON=0 makes `warm_python` plain `sys.executable`.
WARM_PRELOAD = ("numpy", "PIL.Image", "torch", "torch._dynamo", "scipy.optimize", "scipy.stats", "psutil", "pandas",
                "pyarrow")  # fmt: skip
# The free variables, besides warm_python's defaults: the Hub libraries', ours, Ray's, pytest's, and the one torch's
# inductor sets in this worker whenever it loads a compiled module (test_compile.py), for that module to read.
WARM_FREE_ENV = ("HF_*", "HUGGINGFACE_*", "TRANSFORMERS_*", "DIFFUSERS_*", "DINALRM_*", "GRADIO_*", "RAY_*",
                 "PYTEST_*", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR")  # fmt: skip
SESSION_ENVIRONMENT = dict(os.environ)  # as this worker started: no test's monkeypatching


@pytest.fixture(scope="session")
def warm_python(tmp_path_factory) -> Iterator[str]:
    """The `python` that tests run command lines with (see WARM_PRELOAD above)."""
    if os.environ.get("DINALRM_WARM_PYTHON") == "0":
        yield sys.executable
        return
    from dinalrm.testing.warm_python import start

    folder = tmp_path_factory.mktemp("warm-python")
    server = start(folder, WARM_PRELOAD, WARM_FREE_ENV, env=SESSION_ENVIRONMENT)
    yield str(folder / "python")
    server.terminate()
    server.wait(timeout=60)
    fresh = [
        line.split("\t")[1] for line in (folder / "requests.log").read_text().splitlines() if line.startswith("fresh")
    ]
    if fresh:  # still right, only slower: a library set a variable in this worker, or a test asked for another one
        warnings.warn(f"{len(fresh)} command lines ran in a fresh interpreter: {sorted(set(fresh))}", stacklevel=1)


@pytest.fixture(scope="session")
def warm_bin(tmp_path_factory, warm_python) -> str:
    """A folder to put first on a shell's PATH: `python` is `warm_python`, and `dinalrm` and `accelerate` are the
    console scripts `pip install` writes for them, run by it (`python -m` of their entry points)."""
    folder = tmp_path_factory.mktemp("warm-bin")
    commands = {
        "python": f'exec "{warm_python}" "$@"',
        "dinalrm": f'exec "{warm_python}" -m dinalrm.cli "$@"',
        "accelerate": f'exec "{warm_python}" -m accelerate.commands.accelerate_cli "$@"',
    }
    for name, line in commands.items():
        (folder / name).write_text(f"#!/bin/sh\n{line}\n")
        (folder / name).chmod(0o755)
    return str(folder)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for servers started by tests."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load_space_app() -> types.ModuleType:
    """`space/app.py` as a module (the Space folder is not a package)."""
    if "dinalrm_space_app" not in sys.modules:
        spec = importlib.util.spec_from_file_location("dinalrm_space_app", REPO_ROOT / "space" / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["dinalrm_space_app"]


def run_converter(
    official_dir: Path, output_dir: Path, *extra: str, python: str | None = None
) -> subprocess.CompletedProcess:
    """scripts/convert_official_checkpoint.py with these flags: as a user runs it, with the interpreter `python` (the
    `warm_python` fixture), else the `dinalrm convert dinalrm` it runs, in this process. Either way the exit status
    and what reached stderr (a `SystemExit` message is printed there, as Python does on exit)."""
    arguments = ["--official_dir", str(official_dir), "--backbone", str(OFFICIAL_TINY / "transformer")]
    arguments += ["--output_dir", str(output_dir), *extra]
    if python:
        script = str(REPO_ROOT / "scripts" / "convert_official_checkpoint.py")
        return subprocess.run(
            [python, script, *arguments], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
    from dinalrm.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            returncode = main(["convert", "dinalrm", *arguments])
        except SystemExit as exit_:
            returncode = exit_.code if isinstance(exit_.code, int) else 1
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)
    return subprocess.CompletedProcess(
        ["dinalrm", "convert", "dinalrm", *arguments], returncode, "", stderr.getvalue()
    )


def use_hub_cache(monkeypatch: pytest.MonkeyPatch, cache: str | os.PathLike, home: str | os.PathLike | None = None):
    """Point this process's huggingface_hub, offline, at the Hub cache `cache` (and `home` as `HF_HOME`) until the
    test ends: what a fresh interpreter reads from `HF_HUB_CACHE` / `HF_HOME` at import, huggingface_hub reads from
    its constants at call time."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    if home is not None:
        monkeypatch.setattr("huggingface_hub.constants.HF_HOME", str(home))


def rounding_by_row(encode):
    """`encode` whose latents carry a different last-bit error in each batch row, as some VAE kernels round equal
    rows of a batch differently (seen on CI: a tie broken by one ULP)."""

    def encode_rounding_by_row(pixels, *args):
        latents = encode(pixels, *args)
        rows = torch.arange(len(latents), dtype=latents.dtype).view(-1, *[1] * (latents.ndim - 1))
        return latents * (1 + 1e-6 * rows)

    return encode_rounding_by_row


def copy_official(tmp_path: Path, **model_overrides) -> Path:
    """A writable copy of the official-tiny checkpoint folder with `model:` config entries overridden."""
    target = tmp_path / "official"
    shutil.copytree(OFFICIAL_TINY, target, ignore=shutil.ignore_patterns("transformer", "*.md"))
    config = json.loads((target / "config.json").read_text())
    config["model"].update(model_overrides)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture
def safetensors_reads(monkeypatch):
    """`(opened, read)`: the basenames of the safetensors files opened and the tensor names read while the test
    runs, recorded by wrapping `safetensors.safe_open` (which selective readers import when they read)."""
    import safetensors

    opened, read = [], []
    real_open = safetensors.safe_open

    class RecordingOpen:
        def __init__(self, path, *args, **kwargs):
            opened.append(os.path.basename(path))
            self._handle = real_open(path, *args, **kwargs)

        def __enter__(self):
            self._inner = self._handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self._handle.__exit__(*exc)

        def keys(self):
            return self._inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self._inner.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", RecordingOpen)
    return opened, read


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread (and the CPU is shared); use with `usefixtures`."""
    from dinalrm.testing import torch_threads

    with torch_threads(1):
        yield


# The photo preference pairs of the learning tests (tests/test_train_learning*.py, `dinalrm.data.photo_pairs`).
PHOTO_SIZE = 64
PHOTO_TRAIN_PAIRS, PHOTO_HELD_OUT_PAIRS = 1500, 250


@pytest.fixture(scope="session")
def photo_pairs(tmp_path_factory) -> Path:
    """Training pairs (`train/`, training photos, draw seed 0) and held-out pairs (`held-out/`, held-out photos, seed
    1) in the canonical format, built once per test run: under xdist the workers share one copy in the run's
    temporary folder (above each worker's own), built by the first that asks while the others wait on a file lock."""
    from filelock import FileLock  # a dependency of huggingface_hub, as for dinalrm.evaluation.isolated

    from dinalrm.data import write_canonical_pairs
    from dinalrm.data.photo_pairs import load_photos, make_pairs, split_photos

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / "photo-pairs"
    with FileLock(f"{folder}.lock"):
        if not (folder / "complete").is_file():
            photos = load_photos()
            train_names, held_out_names = split_photos([name for name, _ in photos])
            for split_dir, names, count, seed, split in (
                ("train", train_names, PHOTO_TRAIN_PAIRS, 0, "train"),
                ("held-out", held_out_names, PHOTO_HELD_OUT_PAIRS, 1, "test"),
            ):
                subset = [(name, image) for name, image in photos if name in names]
                # Rows of prompt, chosen, rejected and the extra columns kind and photo (read by the tests).
                write_canonical_pairs(folder / split_dir, make_pairs(subset, count, size=PHOTO_SIZE, seed=seed), split)
            (folder / "complete").touch()
    return folder


@pytest.fixture(scope="session")
def official_inputs() -> dict[str, torch.Tensor]:
    # Fresh copies: the expected values were computed on freshly allocated tensors (see the fixture README).
    return {k: v.clone() for k, v in load_file(OFFICIAL_TINY / "inputs.safetensors").items()}


@pytest.fixture(scope="session")
def official_expected() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(OFFICIAL_TINY / "expected.safetensors").items()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = tolerances.FORWARD_RTOL):
    """Max |difference| within `rtol` of the expected tensor's largest |value| (tests/tolerances.py's policy)."""
    tolerances.assert_close(actual, expected, rtol=rtol, msg=name)


@pytest.fixture(scope="session")
def lrm_tiny_config() -> dict:
    """Every setting of the official LRM / LPO reference run (`tests/fixtures/official-lrm-tiny/config.json`)."""
    return json.loads((OFFICIAL_LRM_TINY / "config.json").read_text())


@pytest.fixture(scope="session")
def lrm_tiny_inputs() -> dict[str, torch.Tensor]:
    return load_file(OFFICIAL_LRM_TINY / "inputs.safetensors")


@pytest.fixture(scope="session")
def lrm_tiny_expected() -> dict[str, torch.Tensor]:
    return load_file(OFFICIAL_LRM_TINY / "expected.safetensors")


@pytest.fixture(scope="session")
def converted_dirs(tmp_path_factory) -> dict[str, Path]:
    """The official-tiny checkpoint converted (`dinalrm convert dinalrm`), merged and as an adapter."""
    root = tmp_path_factory.mktemp("converted")
    dirs = {"merged": root / "merged", "adapter": root / "adapter"}
    for form, flags in (("merged", ()), ("adapter", ("--keep_lora_adapter",))):
        result = run_converter(OFFICIAL_TINY, dirs[form], *flags)
        assert result.returncode == 0, result.stderr
    return dirs


# A block that cannot run offline on the tiny stand-ins is preceded by this comment, with the reason.
NO_RUN = "<!-- no-run:"


def documentation_pages() -> list[Path]:
    """The README, then the docs pages in the site's navigation order."""
    nav = re.findall(r"^  - [^:]+: (\S+\.md)$", (REPO_ROOT / "mkdocs.yml").read_text(), re.M)
    return [REPO_ROOT / "README.md", *(REPO_ROOT / "docs" / page for page in nav)]


def code_blocks(text: str, language: str) -> tuple[list[str], int]:
    """The `language` blocks of a Markdown text that are meant to run, and how many are marked no-run."""
    blocks, skipped = [], 0
    for before, block in zip(text.split(f"```{language}\n")[:-1], text.split(f"```{language}\n")[1:]):
        if before.rstrip().splitlines()[-1:] and before.rstrip().splitlines()[-1].startswith(NO_RUN):
            skipped += 1
        else:
            blocks.append(block.split("```", 1)[0])
    return blocks, skipped
