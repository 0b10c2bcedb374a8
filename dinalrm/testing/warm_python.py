"""Run Python command lines as forks of one interpreter that has imported the heavy libraries once.

A run of many small scripts (`QUICK=1 bash examples/tiny_world/regenerate.sh`, the test suite's command-line
tests) is mostly interpreter start-up: importing torch, diffusers and transformers costs about 10 CPU seconds per
process. `serve FOLDER` imports them once, listens, and then writes `FOLDER/python`, an executable that stands in
for `python`: `FOLDER/python script.py ARGS`, `FOLDER/python -m module ARGS` and `FOLDER/python -c CODE ARGS`
(each optionally after `-u`) run in a fork of the server with the caller's arguments, working directory,
environment and standard streams, as a fresh interpreter runs them (`__name__ == "__main__"`, `sys.path` from the
script's folder and `PYTHONPATH`, fresh seeds for `random` and NumPy, the exit status, the traceback of an uncaught
exception, atexit functions), and exit with its status. A fork sees the stand-in as `sys.executable`, so the Python
subprocesses it starts (`accelerate launch`, ...) are forks too. The stand-in ends as its fork did: with its exit
status, or killed by the same signal. The server runs until SIGTERM or until its parent process ends; its CPU time
includes its forks' once they ended.

    python -m dinalrm.testing.warm_python serve /tmp/warm &
    until [ -x /tmp/warm/python ]; do sleep 0.2; done
    /tmp/warm/python examples/tiny_world/make_pairs.py --generator assets/tiny-sd3 --output_dir /tmp/pairs

The forks share the modules the server imported, and those read some environment variables while they loaded
(`HF_HOME` for huggingface_hub, `OMP_NUM_THREADS` for OpenMP, ...). So a command line is forked only when its
environment equals the server's in every variable but the free ones (`--free-env`: names, or prefixes ending in
`*`), which may differ; a free variable that the preload read by name while it imported (the server notes those)
is compared all the same. What the preload set (torch's TORCHINDUCTOR_CACHE_DIR) is set in each fork, as in a
fresh interpreter. Everything else runs in a fresh interpreter, as typed: another environment, or other
interpreter options. The
stand-in's open file descriptors (the standard streams, `pass_fds`, multiprocessing's pipes) are the fork's, at
the same numbers.
`FOLDER/requests.log` says, one line per command that reached the server, which way it ran and why (`forked` or
`fresh`, the reason, the command line as JSON).

Unlike fresh interpreters, the forks share the server's hash seed, a script's `sys.argv[0]` is its absolute path
(as its `__file__`), and the resource usage a parent reads of its child (`os.wait4`, peak RSS) is the stand-in's,
not the fork's. Linux only (an abstract socket); the stand-in's side uses the standard library alone.
"""

from __future__ import annotations

import argparse
import atexit
import builtins
import fcntl
import fnmatch
import gc
import importlib
import json
import os
import random
import runpy
import selectors
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from collections.abc import Collection, Iterable
from contextlib import contextmanager
from typing import NoReturn


#: What the tiny world's scripts import at start-up; `module:attribute` also resolves a lazily imported attribute.
DEFAULT_PRELOAD = (
    "numpy",
    "PIL.Image",
    "torch",
    "transformers:CLIPTextModelWithProjection",
    "transformers:T5EncoderModel",
    "diffusers:StableDiffusion3Pipeline",
    "diffusers:AutoencoderKL",
    "diffusers:SD3Transformer2DModel",
    "accelerate",
    "peft",
    "datasets",
    "safetensors.torch",
    "matplotlib.pyplot",  # the backend is chosen at the first figure, so a fork's matplotlib.use("Agg") still holds
    "modeling_dinalrm",
    "pipeline_dinalrm",
)
#: Variables that may differ between a forked command and the server: the shell's (and pyenv's shims') bookkeeping,
#: the terminal's size, the search paths (the fork computes `sys.path` from the caller's PYTHONPATH), the debugger
#: hook (read at each `breakpoint()`), and what `accelerate launch` and torchrun set for each worker, read when a
#: process group is made rather than at import. Any of them the preload reads by name is compared all the same.
DEFAULT_FREE_ENV = (
    "PWD", "OLDPWD", "_", "SHLVL", "PYENV_*", "_PYENV_*", "COLUMNS", "LINES", "PATH", "PYTHONPATH", "PYTHONBREAKPOINT",
    "ACCELERATE_*", "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
    "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_*", "TORCH_NCCL_*",
)  # fmt: skip
_HEADER = struct.Struct("!Q")  # length of the JSON request that follows it (the caller's file descriptors ride on it)
_MAX_FDS = 250  # a little below the kernel's limit of descriptors per message (SCM_MAX_FD, 253)
_STATUS = struct.Struct("!i")  # the fork's exit code (negative: the signal that ended it)
_FRESH = b"F"  # the server's answer when the command must run in a fresh interpreter (else _SERVED, then the status)
_SERVED = b"S"


def _is_free(name: str, free: Iterable[str], read: Collection[str]) -> bool:
    """Whether `name` may differ from the server's: a `free` pattern matches it and the preload did not `read` it."""
    return name not in read and any(fnmatch.fnmatchcase(name, pattern) for pattern in free)


def _environment_difference(
    env: dict[str, str],
    served: dict[str, str],
    preload_set: dict[str, str | None],
    free: Iterable[str],
    read: Collection[str],
) -> list[str]:
    """The variables outside `free` whose value in `env` is not the one in `served` (set, changed or unset), less
    those `env` has as the preload set them (a fork's own children inherit them)."""
    names = set(env) | set(served)
    return sorted(
        name
        for name in names
        if env.get(name) != served.get(name)
        and not _is_free(name, free, read)
        and not (name in preload_set and env.get(name) == preload_set[name])
    )


def _command_line(argv: list[str]) -> tuple[bool, list[str]] | None:
    """`(unbuffered, the command line after -u)` when a fork can run `python ARGV`: a script, `-m MODULE` or
    `-c CODE`, optionally after `-u`. None for other interpreter options (they change the interpreter itself)."""
    unbuffered = argv[:1] == ["-u"]
    rest = argv[1:] if unbuffered else argv
    if not rest or (rest[0].startswith("-") and not (rest[0] in ("-m", "-c") and len(rest) >= 2)):
        return None
    return unbuffered, rest


def _client(address: str, argv: list[str]) -> int:
    """The stand-in: send `argv`, the working directory, the environment and its open file descriptors (the standard
    streams, and any the caller passed on); then end as the fork ended (its exit status, or the signal that killed
    it). A command a fork cannot run as typed runs in a fresh interpreter instead (this one is the server's)."""
    fds = sorted(fd for fd in map(int, os.listdir("/proc/self/fd")) if _is_open(fd))  # less the listing's own
    if _command_line(argv) is None or len(fds) > _MAX_FDS:
        _fresh(argv)
    payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "fd_numbers": fds}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect("\0" + address)
        socket.send_fds(connection, [_HEADER.pack(len(payload))], fds)
        connection.sendall(payload)
        if _receive_exactly(connection, 1) == _FRESH:
            connection.close()
            _fresh(argv)
        status = _receive_exactly(connection, _STATUS.size)
    if len(status) < _STATUS.size:
        print(f"warm_python: the server ended before `python {shlex.join(argv)}` did", file=sys.stderr)
        return 1
    (code,) = _STATUS.unpack(status)
    if code < 0:  # killed by a signal: so is the stand-in, for its parent to see the same (a returncode of -N)
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # the two whose action cannot be changed
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code  # a signal whose default action is not to end the process
    return code


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _fresh(argv: list[str]) -> NoReturn:
    """Become a fresh interpreter running `python ARGV` (this process's environment is the caller's)."""
    os.execv(sys.executable, [sys.executable, *argv])


def _receive_exactly(connection: socket.socket, size: int) -> bytes:
    """`size` bytes from `connection`, or fewer if it closes first."""
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _receive(connection: socket.socket) -> dict:
    header, fds, _, _ = socket.recv_fds(connection, _HEADER.size, _MAX_FDS)
    try:
        if len(header) != _HEADER.size:
            raise ConnectionError("malformed request")
        (length,) = _HEADER.unpack(header)
        payload = _receive_exactly(connection, length)
        if len(payload) < length:
            raise ConnectionError("request cut short")
        request = json.loads(payload)
        if len(request["fd_numbers"]) != len(fds):
            raise ConnectionError("the file descriptors did not all come")
    except (OSError, ValueError, KeyError):
        for fd in fds:
            os.close(fd)
        raise
    return {**request, "fds": fds}


def _serve(
    listener: socket.socket,
    served: dict[str, str],
    preload_set: dict[str, str | None],
    free: tuple[str, ...],
    read: frozenset[str],
    log_path: str,
) -> dict | None:
    """Fork one child per request whose environment is `served` but for the `free` variables the preload did not
    `read` (and those it set), until SIGTERM or the parent's end. In a child, returns its request; the server, None
    once it stops."""
    parent = os.getppid()
    wake_read, wake_write = socket.socketpair()  # SIGCHLD and SIGTERM wake the selector through it
    wake_write.setblocking(False)
    signal.set_wakeup_fd(wake_write.fileno())
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    selector.register(wake_read, selectors.EVENT_READ, None)
    running: dict[int, socket.socket] = {}  # pid -> its stand-in's connection
    log = open(log_path, "a", buffering=1)
    while not stop and os.getppid() == parent:
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj is wake_read:
                wake_read.recv(64)
            elif key.fileobj is listener:
                connection, _ = listener.accept()
                try:
                    request = _receive(connection)
                except (OSError, ValueError, KeyError) as error:
                    print(f"warm_python: dropped a request: {error}", file=sys.stderr, flush=True)
                    connection.close()
                    continue
                differing = _environment_difference(request["env"], served, preload_set, free, read)
                if differing:
                    log.write(f"fresh\tanother {', '.join(differing)}\t{json.dumps(request['argv'])}\n")
                    for fd in request["fds"]:
                        os.close(fd)
                    try:
                        connection.sendall(_FRESH)
                    except OSError:
                        pass
                    connection.close()
                    continue
                log.write(f"forked\t\t{json.dumps(request['argv'])}\n")
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    for handle in (selector, listener, connection, wake_read, wake_write, log, *running.values()):
                        handle.close()
                    return request
                for fd in request["fds"]:
                    os.close(fd)
                try:
                    connection.sendall(_SERVED)
                except OSError:  # the stand-in is gone already: the reaping below ends its fork
                    pass
                running[pid] = connection
                selector.register(connection, selectors.EVENT_READ, pid)
            elif key.data in running:  # the stand-in ended first (it was killed): so does its fork
                selector.unregister(key.fileobj)
                os.kill(key.data, signal.SIGTERM)
        while running:  # reap the forks that ended; their stand-ins (if still there) get the exit status
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = running.pop(pid)
            if connection.fileno() in selector.get_map():
                selector.unregister(connection)
                try:
                    connection.sendall(_STATUS.pack(os.waitstatus_to_exitcode(status)))
                except OSError:  # the stand-in ended in the meantime
                    pass
            connection.close()
    for pid in running:
        os.kill(pid, signal.SIGTERM)
    for pid in running:
        os.waitpid(pid, 0)
    log.close()
    return None


def _execute(request: dict, stand_in: str, preload_set: dict[str, str | None]) -> NoReturn:
    """In a fresh fork of the server: become the interpreter of `request["argv"]` and exit with its status.
    `preload_set`: the variables the preload set (None: removed), as it would have in a fresh interpreter."""
    # The caller's descriptors at their own numbers: first above every number involved, then into place.
    above = max(request["fd_numbers"] + request["fds"]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, above) for fd in request["fds"]]
    for fd in request["fds"]:
        os.close(fd)
    for fd, number in zip(moved, request["fd_numbers"]):
        os.dup2(fd, number)
        os.close(fd)
    unbuffered, argv = _command_line(request["argv"])
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    if unbuffered:  # -u (PYTHONUNBUFFERED is the server's own, which set up its streams)
        sys.stdout.reconfigure(write_through=True)
        sys.stderr.reconfigure(write_through=True)
    os.chdir(request["cwd"])
    served_path = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ.clear()
    os.environ.update(request["env"])
    for name, value in preload_set.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    python_path = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    base = [p for p in sys.path[1:] if os.path.abspath(p) not in served_path]
    sys.executable = stand_in
    random.seed()  # a fresh interpreter seeds these from the system; the forks would all repeat the server's draws
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    code = 0
    try:
        if argv[0] == "-m":
            sys.path[:] = [os.getcwd(), *python_path, *base]
            sys.argv = ["-m", *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.path[:] = ["", *python_path, *base]
            sys.argv = ["-c", *argv[2:]]
            main = types.ModuleType("__main__")
            main.__builtins__ = builtins
            sys.modules["__main__"] = main
            exec(compile(argv[1], "<string>", "exec"), vars(main))
        else:
            sys.path[:] = [os.path.dirname(os.path.realpath(argv[0])), *python_path, *base]
            sys.argv = list(argv)
            runpy.run_path(os.path.abspath(argv[0]), run_name="__main__")  # sets __file__ and argv[0]
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    # What the interpreter does at exit, less tearing down every module (seconds of copy-on-write in a fork of a
    # process that imported torch): join the non-daemon threads, run the atexit functions, flush, exit.
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


@contextmanager
def _environment_reads(reads: set[str]):
    """Note in `reads` each variable read by name from `os.environ` (or `os.getenv`) inside the block. A walk over
    or a copy of the whole environment (tqdm and fsspec look for their own prefixes that way) reads no name in
    particular."""
    environ = type(os.environ)  # `get`, `in` and `os.getenv` go through `__getitem__`; `dict(os.environ)`, `keys`
    getitem, keys = environ.__getitem__, environ.keys
    copying: list[str] = []  # the names a copy in progress will read, in order

    def noted_getitem(self, name):
        if copying and copying[0] == name:
            copying.pop(0)
        else:
            reads.add(name)
        return getitem(self, name)

    def unnoted_keys(self):
        copying[:] = list(self)
        return keys(self)

    def unnoted_items(self):
        return [(name, getitem(self, name)) for name in list(self)]

    environ.__getitem__, environ.keys, environ.items = noted_getitem, unnoted_keys, unnoted_items
    try:
        yield
    finally:
        environ.__getitem__ = getitem
        del environ.keys, environ.items  # back to Mapping's


def serve(folder: str, preload: list[str], free_env: tuple[str, ...] = DEFAULT_FREE_ENV) -> None:
    """Import `preload`, listen, write the stand-in `folder/python`, and serve until SIGTERM or the parent's end."""
    served, reads = dict(os.environ), set()
    with _environment_reads(reads):
        for name in preload:
            module, _, attribute = name.partition(":")
            imported = importlib.import_module(module)
            if attribute:
                getattr(imported, attribute)
    preload_set = {name: os.environ.get(name) for name in set(served) | set(os.environ)}
    preload_set = {name: value for name, value in preload_set.items() if value != served.get(name)}
    address = f"dinalrm-warm-python-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + address)
    listener.listen(16)
    os.makedirs(folder, exist_ok=True)
    stand_in = os.path.join(os.path.abspath(folder), "python")
    this = os.path.realpath(__file__)
    with open(stand_in + ".tmp", "w") as handle:  # renamed into place once complete: its presence means "ready"
        handle.write(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -I -S {shlex.quote(this)} run {address} "$@"\n')
    os.chmod(stand_in + ".tmp", 0o755)
    os.replace(stand_in + ".tmp", stand_in)
    gc.freeze()  # the preloaded objects stay out of the forks' collections (fewer copy-on-write pages)
    sys.stdout.flush()
    sys.stderr.flush()
    request = _serve(listener, served, preload_set, free_env, frozenset(reads), os.path.join(folder, "requests.log"))
    if request is not None:
        _execute(request, stand_in, preload_set)
    listener.close()
    os.remove(stand_in)


def start(
    folder: str | os.PathLike,
    preload: Iterable[str] = DEFAULT_PRELOAD,
    free_env: Iterable[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> subprocess.Popen:
    """`serve FOLDER` in a new process with the environment `env` (its output to `FOLDER/server.log`); returns it
    once `FOLDER/python` is ready. Stop it with `terminate()`. A server that ends or is not ready within `timeout`
    seconds raises a `RuntimeError` with the end of its log."""
    os.makedirs(folder, exist_ok=True)
    log_path, stand_in = os.path.join(folder, "server.log"), os.path.join(folder, "python")
    command = [sys.executable, os.path.realpath(__file__), "serve", os.fspath(folder), "--preload", *preload]
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [*command, "--free-env", *free_env], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    deadline = time.monotonic() + timeout
    while not os.path.exists(stand_in):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            with open(log_path) as log:
                raise RuntimeError(f"the warm Python server did not start: {log.read()[-2000:]}")
        time.sleep(0.05)
    return server


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"] and len(argv) >= 2:  # the stand-in: everything after the address is its command line
        return _client(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("serve", help="preload, then serve until SIGTERM; FOLDER/python is the stand-in")
    server.add_argument("folder")
    server.add_argument("--preload", nargs="*", default=list(DEFAULT_PRELOAD), help="modules (module:attribute)")
    server.add_argument(
        "--free-env",
        nargs="*",
        default=[],
        help="more variables (or PREFIX*) that may differ between a forked command and the server",
    )
    commands.add_parser("run", help="what the stand-in runs (`run ADDRESS ARGV...`): one command line")
    args = parser.parse_args(argv)
    serve(args.folder, args.preload, (*DEFAULT_FREE_ENV, *args.free_env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
