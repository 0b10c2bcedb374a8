"""Scorers that run their own published package in their own virtual environment, behind a JSON-lines protocol.

HPSv2, HPSv3 and ImageReward pin libraries that cannot share an environment with ours (`protobuf<4`,
`timm==0.6.13`, `transformers==4.45.2`, ...). Each therefore gets a virtual environment created on first use with
`uv venv` + `uv pip install -r <pinned requirements>` (the files in `requirements/` next to this module), cached
under `$DINALRM_CACHE/scorer-envs` (default: `$HF_HOME/dinalrm/scorer-envs`) in a folder named by the hash of its
requirements and Python, so a changed pin makes a new environment and never reuses a stale one. The runner then
starts `isolated_worker.py` with that environment's Python and talks to it over stdin/stdout (see the worker's
docstring for the protocol): image paths and prompts in, one score per image out, errors as JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from PIL import Image


logger = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("isolated_worker.py")
REQUIREMENTS_DIR = Path(__file__).with_name("requirements")
COMPLETE_MARKER = ".dinalrm-complete"


@dataclass(frozen=True)
class IsolatedBackend:
    """A published scorer: its worker backend name, pinned requirements file and display name."""

    backend: str
    requirements: Path
    display_name: str


BACKENDS: dict[str, IsolatedBackend] = {
    "hpsv2": IsolatedBackend("hpsv2", REQUIREMENTS_DIR / "hpsv2.txt", "HPSv2.1"),
    "hpsv3": IsolatedBackend("hpsv3", REQUIREMENTS_DIR / "hpsv3.txt", "HPSv3"),
    "imagereward": IsolatedBackend("imagereward", REQUIREMENTS_DIR / "imagereward.txt", "ImageReward"),
}


class WorkerError(RuntimeError):
    """A scorer worker failed: it reported an error, died, or answered outside the protocol."""


def cache_root() -> Path:
    """Where scorer environments live: `$DINALRM_CACHE/scorer-envs`, else `$HF_HOME/dinalrm/scorer-envs`."""
    if os.environ.get("DINALRM_CACHE"):
        return Path(os.environ["DINALRM_CACHE"]) / "scorer-envs"
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "dinalrm" / "scorer-envs"


def find_uv() -> str:
    """The `uv` executable: the `uv` package's binary (`pip install uv`, in the eval extra) or one on PATH."""
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
    if found is None:
        raise FileNotFoundError(
            "Isolated scorers create their environment with uv, which is not installed: `pip install uv` "
            "(or `pip install 'dinalrm[eval]'`)."
        )
    return found


def env_python(env_dir: Path) -> Path:
    """The Python executable of a virtual environment folder."""
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run_uv(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-20:])
        raise RuntimeError(f"{what} failed (exit {result.returncode}): {' '.join(command)}\n{tail}")


def ensure_env(
    name: str,
    requirements: str | os.PathLike[str],
    *,
    python: str = sys.executable,
    find_links: Sequence[str] = (),
    no_index: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """The Python of `name`'s environment, created with `uv venv` + `uv pip install -r requirements` if absent.

    The folder is `<cache>/<name>-<hash>`, the hash covering the requirements' text and `python`'s path and version,
    so an edited pin gets a fresh environment. `find_links` / `no_index` point uv at local wheels (offline mirrors,
    tests). Creation holds a file lock (several processes may start at once) and is marked complete only after
    the install succeeded; a half-built folder is rebuilt.
    """
    requirements = Path(requirements)
    if not requirements.is_file():
        raise FileNotFoundError(f"No requirements file for scorer {name!r} at {requirements}.")
    version = subprocess.run(
        [python, "-c", "import sys; print(sys.version)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    key = hashlib.sha256(f"{requirements.read_text()}\0{python}\0{version}".encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    env_dir = root / f"{name}-{key}"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(env_dir) + ".lock"):
        if (env_dir / COMPLETE_MARKER).is_file():
            return env_python(env_dir)
        if env_dir.exists():
            logger.warning("Rebuilding the incomplete scorer environment %s.", env_dir)
            shutil.rmtree(env_dir)
        uv = find_uv()
        logger.info(
            "Creating the %s scorer environment in %s (first use; this downloads its packages).", name, env_dir
        )
        _run_uv([uv, "venv", "--quiet", "--python", python, str(env_dir)], f"Creating the {name} environment")
        install = [uv, "pip", "install", "--quiet", "--python", str(env_python(env_dir)), "-r", str(requirements)]
        for link in find_links:
            install += ["--find-links", str(link)]
        if no_index:
            install.append("--no-index")
        _run_uv(install, f"Installing the {name} scorer's requirements")
        (env_dir / COMPLETE_MARKER).write_text(requirements.read_text())
    return env_python(env_dir)


def _stop(process: subprocess.Popen) -> None:
    """Close the worker's stdin (it exits when its input ends) and wait; kill it if it does not."""
    if process.poll() is None:
        try:
            process.stdin.close()
            process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()


class IsolatedWorker:
    """A running `isolated_worker.py`: `score(prompts, paths)` sends one request and returns its scores.

    The worker's stderr (the package's logs and progress bars) passes through to ours.
    """

    def __init__(
        self, python: str | os.PathLike[str], backend: str, device: str = "cpu", options: dict | None = None
    ) -> None:
        command = [str(python), str(WORKER), "--backend", backend, "--device", device]
        command += ["--options", json.dumps(options or {})]
        self.backend = backend
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._finalizer = weakref.finalize(self, _stop, self._process)
        self._next_id = 0
        ready = self._receive()
        if not ready.get("ready"):
            self.close()
            raise WorkerError(f"The {backend} scorer could not start: {ready.get('error')}")
        self.package, self.version = ready.get("package"), ready.get("version")

    def _receive(self) -> dict[str, Any]:
        line = self._process.stdout.readline()
        if not line:
            code = self._process.wait()
            raise WorkerError(
                f"The {self.backend} scorer worker exited (code {code}) without answering; see its log above."
            )
        try:
            message = json.loads(line)
        except json.JSONDecodeError as err:
            raise WorkerError(f"The {self.backend} scorer worker wrote a line outside the protocol: {line!r}") from err
        if not isinstance(message, dict):
            raise WorkerError(f"The {self.backend} scorer worker answered {message!r}, not a JSON object.")
        return message

    def score(self, prompts: Sequence[str], paths: Sequence[str | os.PathLike[str]]) -> list[float]:
        """One finite score per path (higher = preferred), in order."""
        if len(prompts) != len(paths):
            raise ValueError(f"{len(prompts)} prompts for {len(paths)} image paths.")
        request_id, self._next_id = self._next_id, self._next_id + 1
        request = {"id": request_id, "prompts": list(prompts), "paths": [os.fspath(p) for p in paths]}
        try:
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            raise WorkerError(f"The {self.backend} scorer worker is gone (exit {self._process.poll()}).") from err
        answer = self._receive()
        if answer.get("id") != request_id:
            raise WorkerError(f"The {self.backend} scorer answered request {answer.get('id')}, expected {request_id}.")
        if "error" in answer:
            raise WorkerError(f"The {self.backend} scorer failed: {answer['error']}")
        scores = answer.get("scores")
        if not isinstance(scores, list) or len(scores) != len(paths):
            raise WorkerError(f"The {self.backend} scorer returned {scores!r} for {len(paths)} images.")
        if not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores):
            raise WorkerError(f"The {self.backend} scorer returned non-finite scores: {scores!r}.")
        return [float(s) for s in scores]

    def score_images(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> list[float]:
        """`score` for decoded images: each is written losslessly (PNG) to a temporary folder first."""
        with tempfile.TemporaryDirectory(prefix="dinalrm-score-") as folder:
            paths = []
            for index, image in enumerate(images):
                paths.append(os.path.join(folder, f"{index}.png"))
                image.convert("RGB").save(paths[-1])
            return self.score(prompts, paths)

    def close(self) -> None:
        """Stop the worker (idempotent)."""
        self._finalizer()

    def __enter__(self) -> IsolatedWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_scorer(
    name: str,
    device: str = "cpu",
    *,
    find_links: Sequence[str] = (),
    no_index: bool = False,
    options: dict | None = None,
    requirements: str | os.PathLike[str] | None = None,
    backend: str | None = None,
) -> IsolatedWorker:
    """The worker of published scorer `name` (a key of `BACKENDS`), its environment created on first use.

    `requirements` / `backend` replace the registered ones (a stand-in package in tests, a patched pin).
    """
    if name not in BACKENDS and (requirements is None or backend is None):
        raise ValueError(f"Unknown isolated scorer {name!r}; choose one of {', '.join(BACKENDS)}.")
    spec = BACKENDS.get(name)
    python = ensure_env(name, requirements or spec.requirements, find_links=find_links, no_index=no_index)
    return IsolatedWorker(python, backend or spec.backend, device, options)
