"""dinalrm.testing.warm_python: a command line run through the stand-in behaves as under a fresh `python` (arguments,
`sys.path`, working directory, environment, streams and passed descriptors, exit status, atexit), the Python
subprocesses it starts are forks of the server too, and what a fork could not run as typed (another environment,
other interpreter options) runs in a fresh interpreter. The server preloads a small module of its own here, which
reads one variable and sets another while it imports, so this is cheap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from dinalrm.testing.warm_python import start


# The preload: what it reads and sets at import is what a fork's environment must agree with.
PRELOAD = """\
import os
SETTING = os.environ.get("WARM_TEST_SETTING")
os.environ["WARM_TEST_SET_BY_PRELOAD"] = "yes"
"""

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
elif sys.argv[1:] == ["kill"]:
    import signal
    os.kill(os.getpid(), signal.SIGKILL)
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
    (root / "preload").mkdir()
    (root / "preload" / "warm_test_preload.py").write_text(PRELOAD)
    env = {**os.environ, "PYTHONPATH": str(root / "preload")}
    env.pop("WARM_TEST_SETTING", None)
    free = ["WARM_TEST", "WARM_FREE_*", "WARM_TEST_SETTING", "PYTEST_*"]
    server = start(root / "warm", ["warm_test_preload"], free, env=env, timeout=60)
    stand_in = root / "warm" / "python"
    yield {"root": root, "stand_in": str(stand_in), "server": server, "log": root / "warm" / "requests.log"}
    server.terminate()
    assert server.wait(timeout=30) == 0  # SIGTERM stops it cleanly
    assert not stand_in.exists()


def _run(warm: dict, *argv: str, input: str = "", **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WARM_TEST": "passed", "PYTHONPATH": str(warm["root"] / "lib")}
    env.pop("WARM_TEST_SETTING", None)  # the server's value: unset
    env.update(extra_env)
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
    assert _run(warm, "scripts/probe.py", "kill").returncode == -signal.SIGKILL  # as subprocess reports a signal
    failed = _run(warm, "scripts/probe.py", "fail")
    assert failed.returncode == 1 and "ValueError: boom" in failed.stderr
    assert "atexit ran" in failed.stdout  # the interpreter's exit path also runs after a failure


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


PROBE = "import json, os, sys; print(json.dumps({'argv': sys.argv, 'path0': sys.path[0], 'parent': os.getppid(), "
PROBE += "'executable': sys.executable, 'name': __name__, 'file': globals().get('__file__'), "
PROBE += "'free': os.environ.get('WARM_FREE_X'), 'set_by_preload': os.environ.get('WARM_TEST_SET_BY_PRELOAD')}))"


def _probe(warm: dict, *options: str, **extra_env: str) -> dict:
    result = _run(warm, *options, "-c", PROBE, "an argument", **extra_env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_code_on_the_command_line_runs_as_under_a_fresh_python(warm):
    seen = _probe(warm)
    assert seen["argv"] == ["-c", "an argument"] and seen["path0"] == "" and seen["name"] == "__main__"
    assert seen["file"] is None and seen["parent"] == warm["server"].pid
    assert seen["set_by_preload"] == "yes"  # what the preload set at import, as a fresh interpreter importing it would
    unbuffered = _probe(warm, "-u", WARM_FREE_X="free")
    assert unbuffered["parent"] == warm["server"].pid and unbuffered["free"] == "free"


def test_another_environment_or_other_options_run_in_a_fresh_interpreter(warm):
    forked = _probe(warm, WARM_FREE_X="free")  # a free variable: the preload does not read it
    assert forked["parent"] == warm["server"].pid and forked["free"] == "free"
    fresh = [
        _probe(warm, WARM_TEST_SETTING="other"),  # free, but read by the preload while it imported
        _probe(warm, WARM_TEST_UNRELATED="1"),  # not free, so it might have been read
        _probe(warm, "-I"),  # an interpreter option the fork cannot take
    ]
    for seen in fresh:
        assert seen["parent"] == os.getpid() and seen["executable"] == sys.executable
        assert seen["argv"] == ["-c", "an argument"] and seen["set_by_preload"] is None
    log = warm["log"].read_text()
    assert "fresh\tanother WARM_TEST_SETTING\t" in log and "fresh\tanother WARM_TEST_UNRELATED\t" in log


def test_passed_descriptors_reach_the_fork_and_each_fork_has_its_own_seeds(warm):
    read, write = os.pipe()
    code = "import os, random, sys; os.write(int(sys.argv[1]), str(random.random()).encode()); print(os.getppid())"
    env = {**os.environ, "PYTHONPATH": str(warm["root"] / "lib")}
    env.pop("WARM_TEST_SETTING", None)
    draws = []
    for _ in range(2):
        done = subprocess.run(
            [warm["stand_in"], "-c", code, str(write)], pass_fds=[write], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0 and int(done.stdout) == warm["server"].pid, done.stderr
        draws.append(os.read(read, 100))
    os.close(read)
    os.close(write)
    assert draws[0] != draws[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_suites_command_lines_run_as_forks(warm_python):
    """The conftest's `warm_python` forks a command line in the environment tests give it (this worker's, with the
    Hub variables and PYTHONPATH their own), unless DINALRM_WARM_PYTHON=0 asked for plain `sys.executable`: a
    difference that sent every command to a fresh interpreter would only show as a slower suite. (What libraries set
    in this worker later, a test's commands inherit too: the session's end warns of each command that ran afresh.)"""
    if os.environ.get("DINALRM_WARM_PYTHON") == "0":
        assert warm_python == sys.executable
        return
    from conftest import SESSION_ENVIRONMENT

    env = {**SESSION_ENVIRONMENT, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [warm_python, "-c", "import os; print(os.getppid())"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) != os.getpid(), Path(warm_python).with_name("requests.log").read_text()[-2000:]


def test_a_server_that_cannot_start_says_why(tmp_path):
    with pytest.raises(RuntimeError, match="(?s)did not start.*No module named 'no_such_preload_module'"):
        start(tmp_path / "warm", ["no_such_preload_module"], timeout=60)
    assert not (tmp_path / "warm" / "python").exists()
