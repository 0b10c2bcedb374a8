"""Run Python command lines as forks of one interpreter that has imported the heavy libraries once.

A quick run of many small scripts (`QUICK=1 bash examples/tiny_world/regenerate.sh`, the tiny world's end-to-end
test) is mostly interpreter start-up: importing torch, diffusers and transformers costs about 10 CPU seconds per
process. `serve FOLDER` imports them once, listens, and then writes `FOLDER/python`, an executable that stands in
for `python`: `FOLDER/python script.py ARGS` and `FOLDER/python -m module ARGS` each run in a fork of the server
with the caller's arguments, working directory, environment and standard streams, as a fresh interpreter runs them
(`__name__ == "__main__"`, `sys.path` from the script's folder and `PYTHONPATH`, the exit status, the traceback of
an uncaught exception, atexit functions), and exit with its status. A fork sees the stand-in as `sys.executable`,
so the Python subprocesses it starts (`accelerate launch`, ...) are forks too. The server runs until SIGTERM or
until its parent process ends; its CPU time includes its forks' once they ended.

    python -m dinalrm.testing.warm_python serve /tmp/warm &
    until [ -x /tmp/warm/python ]; do sleep 0.2; done
    /tmp/warm/python examples/tiny_world/make_pairs.py --generator assets/tiny-sd3 --output_dir /tmp/pairs

Unlike fresh interpreters, the forks share the modules the server imported (so environment variables those read at
import time are the server's), a script's `sys.argv[0]` is its absolute path (as its `__file__`), and the resource
usage a parent reads of its child (`os.wait4`, peak RSS) is the stand-in's, not the fork's. Linux only (an abstract
socket); the stand-in's side uses the standard library alone.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import json
import os
import runpy
import selectors
import shlex
import signal
import socket
import struct
import sys
import threading
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
)
_HEADER = struct.Struct("!Q")  # length of the JSON request that follows it
_STATUS = struct.Struct("!i")  # the fork's exit code (negative: the signal that ended it)


def _client(address: str, argv: list[str]) -> int:
    """The stand-in: send `argv`, the working directory, the environment and fds 0-2; the fork's exit status."""
    payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect("\0" + address)
        socket.send_fds(connection, [_HEADER.pack(len(payload))], [0, 1, 2])
        connection.sendall(payload)
        status = b""
        while len(status) < _STATUS.size:
            chunk = connection.recv(_STATUS.size - len(status))
            if not chunk:
                print(f"warm_python: the server ended before `python {shlex.join(argv)}` did", file=sys.stderr)
                return 1
            status += chunk
    (code,) = _STATUS.unpack(status)
    return 128 - code if code < 0 else code


def _receive(connection: socket.socket) -> dict:
    header, fds, _, _ = socket.recv_fds(connection, _HEADER.size, 3)
    if len(header) != _HEADER.size or len(fds) != 3:
        raise ConnectionError("malformed request")
    (length,) = _HEADER.unpack(header)
    payload = b""
    while len(payload) < length:
        chunk = connection.recv(length - len(payload))
        if not chunk:
            raise ConnectionError("request cut short")
        payload += chunk
    return {**json.loads(payload), "fds": fds}


def _serve(listener: socket.socket) -> dict | None:
    """Fork one child per request until SIGTERM or the parent's end. In a child, returns its request; the server,
    None once it stops."""
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
    while not stop and os.getppid() == parent:
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj is wake_read:
                wake_read.recv(64)
            elif key.fileobj is listener:
                connection, _ = listener.accept()
                try:
                    request = _receive(connection)
                except (OSError, ValueError) as error:
                    print(f"warm_python: dropped a request: {error}", file=sys.stderr, flush=True)
                    connection.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    for handle in (selector, listener, connection, wake_read, wake_write, *running.values()):
                        handle.close()
                    return request
                for fd in request["fds"]:
                    os.close(fd)
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
    return None


def _execute(request: dict, stand_in: str) -> NoReturn:
    """In a fresh fork of the server: become the interpreter of `request["argv"]` and exit with its status."""
    for target, fd in enumerate(request["fds"]):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    os.chdir(request["cwd"])
    served_path = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ.clear()
    os.environ.update(request["env"])
    python_path = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    base = [p for p in sys.path[1:] if os.path.abspath(p) not in served_path]
    sys.executable = stand_in
    argv = request["argv"]
    code = 0
    try:
        if len(argv) >= 2 and argv[0] == "-m":
            sys.path[:] = [os.getcwd(), *python_path, *base]
            sys.argv = ["-m", *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv and not argv[0].startswith("-"):
            sys.path[:] = [os.path.dirname(os.path.realpath(argv[0])), *python_path, *base]
            sys.argv = list(argv)
            runpy.run_path(os.path.abspath(argv[0]), run_name="__main__")  # sets __file__ and argv[0]
        else:
            sys.exit(
                f"warm_python runs `python SCRIPT ARGS` and `python -m MODULE ARGS`, not `python {shlex.join(argv)}`"
            )
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


def serve(folder: str, preload: list[str]) -> None:
    """Import `preload`, listen, write the stand-in `folder/python`, and serve until SIGTERM or the parent's end."""
    for name in preload:
        module, _, attribute = name.partition(":")
        imported = importlib.import_module(module)
        if attribute:
            getattr(imported, attribute)
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
    request = _serve(listener)
    if request is not None:
        _execute(request, stand_in)
    listener.close()
    os.remove(stand_in)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"] and len(argv) >= 2:  # the stand-in: everything after the address is its command line
        return _client(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("serve", help="preload, then serve until SIGTERM; FOLDER/python is the stand-in")
    server.add_argument("folder")
    server.add_argument("--preload", nargs="*", default=list(DEFAULT_PRELOAD), help="modules (module:attribute)")
    commands.add_parser("run", help="what the stand-in runs (`run ADDRESS ARGV...`): one command line")
    args = parser.parse_args(argv)
    serve(args.folder, args.preload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
