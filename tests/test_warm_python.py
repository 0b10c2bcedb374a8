"""dinalrm.testing.warm_python: a command line run through the stand-in behaves as under a fresh `python` (arguments,
`sys.path`, working directory, environment, streams, exit status, atexit), and the Python subprocesses it starts are
forks of the server too. The server preloads nothing heavy here (`--preload json`), so this is cheap."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import REPO_ROOT


WARM_PYTHON = REPO_ROOT / "dinalrm" / "testing" / "warm_python.py"

SCRIPT = """\
import atexit, json, os, sys
atexit.register(print, "atexit ran")
if sys.argv[1:] == ["nested"]:
    import subprocess
    child = subprocess.run([sys.executable, __file__, "report"], capture_output=True, text=True, check=True)
    print(child.stdout, end="")
elif sys.argv[1:] == ["fail"]:
    raise ValueError("boom")
elif sys.argv[1:] == ["exit"]:
    sys.exit(3)
else:
    import helper
    print(json.dumps({"argv": sys.argv, "path": sys.path[:2], "cwd": os.getcwd(), "env": os.environ.get("WARM_TEST"),
                      "executable": sys.executable, "name": __name__, "parent": os.getppid(),
                      "stdin": sys.stdin.read(), "helper": helper.__file__}))
    print("to stderr", file=sys.stderr)
"""


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    (root / "scripts").mkdir()
    (root / "scripts" / "probe.py").write_text(SCRIPT)
    (root / "lib").mkdir()
    (root / "lib" / "helper.py").write_text("")
    server = subprocess.Popen([sys.executable, str(WARM_PYTHON), "serve", str(root / "warm"), "--preload", "json"])
    stand_in = root / "warm" / "python"
    deadline = time.monotonic() + 60
    while not stand_in.exists():
        assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield {"root": root, "stand_in": str(stand_in), "server": server}
    server.terminate()
    assert server.wait(timeout=30) == 0  # SIGTERM stops it cleanly
    assert not stand_in.exists()


def _run(warm: dict, *argv: str, input: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "WARM_TEST": "passed", "PYTHONPATH": str(warm["root"] / "lib")}
    return subprocess.run(
        [warm["stand_in"], *argv], input=input, capture_output=True, text=True, env=env, cwd=warm["root"], timeout=60
    )


def test_a_script_runs_as_under_a_fresh_python(warm):
    import json

    result = _run(warm, "scripts/probe.py", "a", "--b", input="from stdin")
    assert result.returncode == 0, result.stderr
    out, atexit_line = result.stdout.splitlines()
    seen = json.loads(out)
    # argv[0] is the script's absolute path, like its __file__ (a fresh python keeps argv[0] as typed)
    assert seen["argv"] == [str(warm["root"] / "scripts" / "probe.py"), "a", "--b"] and seen["name"] == "__main__"
    # sys.path[0] is the script's folder, then PYTHONPATH (from the caller's environment, not the server's)
    assert seen["path"] == [str(warm["root"] / "scripts"), str(warm["root"] / "lib")]
    assert seen["helper"] == str(warm["root"] / "lib" / "helper.py")
    assert (seen["cwd"], seen["env"], seen["stdin"]) == (str(warm["root"]), "passed", "from stdin")
    assert seen["executable"] == warm["stand_in"] and seen["parent"] == warm["server"].pid  # a fork of the server
    assert atexit_line == "atexit ran" and result.stderr == "to stderr\n"


def test_exit_status_and_uncaught_exceptions_come_back(warm):
    assert _run(warm, "scripts/probe.py", "exit").returncode == 3
    failed = _run(warm, "scripts/probe.py", "fail")
    assert failed.returncode == 1 and "ValueError: boom" in failed.stderr
    assert "atexit ran" in failed.stdout  # the interpreter's exit path also runs after a failure
    unsupported = _run(warm, "-c", "print(1)")
    assert unsupported.returncode == 1 and "python -m MODULE ARGS" in unsupported.stderr


def test_modules_and_subprocesses(warm):
    import json

    formatted = _run(warm, "-m", "json.tool", input='{"a": 1}')
    assert formatted.returncode == 0 and json.loads(formatted.stdout) == {"a": 1}
    nested = _run(warm, "scripts/probe.py", "nested")
    assert nested.returncode == 0, nested.stderr
    child = json.loads(nested.stdout.splitlines()[0])
    assert child["argv"] == [str(warm["root"] / "scripts" / "probe.py"), "report"]
    assert child["parent"] == warm["server"].pid  # sys.executable started a fork of the server, not a new python


def test_killing_the_stand_in_ends_its_fork(warm, tmp_path):
    pid_file, sleeper = tmp_path / "pid", tmp_path / "sleeper.py"
    sleeper.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    stand_in = subprocess.Popen([warm["stand_in"], str(sleeper)], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()):
        assert stand_in.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    stand_in.kill()
    stand_in.wait()
    fork = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while _alive(fork):  # the server terminates and reaps it
        assert time.monotonic() < deadline, "the fork outlived its stand-in"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
