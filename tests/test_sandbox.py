"""The MBPP sandbox: limits hold, the network and the file system outside its work dir are out of reach,
and nothing is left behind."""

import os
import tempfile

import pytest

from unskill.evals.sandbox import Limits, run_python

FAST = Limits(timeout_s=3)


def sandbox_dirs():
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("unskill-sandbox-")}


def test_pass_and_fail():
    assert run_python("assert sorted([3, 1, 2]) == [1, 2, 3]", FAST).passed
    outcome = run_python("assert 1 + 1 == 3", FAST)
    assert not outcome.passed and outcome.status == "failed" and "AssertionError" in outcome.detail


@pytest.mark.parametrize("code, status, detail", [
    ("while True:\n    pass", "timeout", "over 3 s"),
    ("x = bytearray(4 << 30)", "failed", "MemoryError"),
    ("import os\nos.fork()", "failed", "blocked by the unskill sandbox"),
    ("import subprocess\nsubprocess.run(['true'])", "failed", "blocked by the unskill sandbox"),
    ("import socket\nsocket.create_connection(('127.0.0.1', 9))", "failed", "blocked by the unskill sandbox"),
    ("open('/tmp/unskill-escape.txt', 'w').write('x')", "failed", "outside the work dir"),
])
def test_limits_and_guards(code, status, detail):
    before = sandbox_dirs()
    outcome = run_python(code, FAST)
    assert (outcome.passed, outcome.status) == (False, status) and detail in outcome.detail
    assert not os.path.exists("/tmp/unskill-escape.txt")
    assert sandbox_dirs() == before   # its temp dir is gone


def test_files_outside_cannot_be_deleted(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    outcome = run_python(f"import os, shutil\nos.remove({str(victim)!r})", FAST)
    assert "outside the work dir" in outcome.detail
    assert "outside the work dir" in run_python(f"import shutil\nshutil.rmtree({str(tmp_path)!r})", FAST).detail
    assert victim.read_text() == "precious"


def test_work_dir_is_usable_and_removed():
    before = sandbox_dirs()
    assert run_python("open('notes.txt', 'w').write('x')\nimport os\nassert 'notes.txt' in os.listdir('.')", FAST).passed
    assert sandbox_dirs() == before


def test_a_child_left_running_is_killed():
    """Even with the guards bypassed (os.fork restored from posix), the session is killed at the end."""
    marker = os.path.join(tempfile.gettempdir(), "unskill-orphan-check")
    code = ("import posix, time\nif posix.fork() == 0:\n    time.sleep(2)\n    posix.open(%r, posix.O_CREAT | posix.O_WRONLY)\n"
            % marker)
    try:
        run_python(code, FAST)
        import time
        time.sleep(3)
        assert not os.path.exists(marker)
    finally:
        if os.path.exists(marker):
            os.remove(marker)


# Escapes that get past the Python-level prelude (C-level calls from `posix` and `_socket`): the
# namespaces stop them. CI runs as root, where the sandbox also switches to `nobody`.
from pathlib import Path  # noqa: E402

from unskill.evals.sandbox import isolation  # noqa: E402

namespaces = pytest.mark.skipif(not isolation().startswith("namespaces"),
                                reason=f"no namespaces on this machine (isolation: {isolation()})")
as_nobody = pytest.mark.skipif(isolation() != "namespaces+nobody", reason="the switch to nobody needs root")


def _processes_with(argument: bytes) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if argument in handle.read().split(b"\0"):
                    found.append(pid)
        except OSError:
            pass
    return found


@namespaces
def test_setsid_children_die_with_the_program():
    code = ("import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n"
            "    posix.execv('/bin/sleep', ['sleep', '4321.5'])\ntime.sleep(0.5)\n")
    try:
        assert run_python(code, FAST).passed
        import time
        time.sleep(0.5)
        assert _processes_with(b"4321.5") == []
    finally:
        for pid in _processes_with(b"4321.5"):
            os.kill(int(pid), 9)


@namespaces
def test_c_level_writes_outside_the_work_dir_fail(tmp_path):
    # A world-writable folder on the host's file system, outside the sandbox's own tmpfs scratch (/tmp, /var/tmp,
    # /dev/shm: a checkout under /tmp would not even exist inside), so the write must hit the read-only mount.
    home = Path(__file__).parent
    if str(home).startswith(("/tmp/", "/var/tmp/", "/dev/shm/")):
        home = Path("/")
    outside = home / f".unskill-sandbox-escape-{os.getpid()}"
    outside.mkdir()
    outside.chmod(0o777)
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    try:
        code = (f"import posix\nfd = posix.open({str(outside / 'x')!r}, posix.O_CREAT | posix.O_WRONLY)\n"
                "posix.write(fd, b'escaped')\n")
        outcome = run_python(code, FAST)
        assert not outcome.passed and "Read-only file system" in outcome.detail
        assert not (outside / "x").exists()
        code = f"import posix\nposix.open({str(victim)!r}, posix.O_WRONLY | posix.O_TRUNC)\n"
        assert not run_python(code, FAST).passed   # the host's /tmp is not even visible
        assert victim.read_text() == "precious"
    finally:
        for child in outside.iterdir():
            child.unlink()
        outside.rmdir()


@namespaces
def test_no_network_even_from_c_level_sockets():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n"
        outcome = run_python(code, FAST)
        assert not outcome.passed and "unreachable" in outcome.detail.lower()
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()


@as_nobody
def test_runs_as_nobody_and_sees_a_minimal_etc():
    code = ("import os\nassert os.getuid() == 65534 and os.getgid() == 65534\n"
            "lines = open('/etc/passwd').read().splitlines()\n"
            "assert [l.split(':')[0] for l in lines] == ['root', 'nobody'], lines\n"
            "assert len([p for p in os.listdir('/proc') if p.isdigit()]) < 5   # its own PID namespace\n"
            "try:\n    open('/etc/shadow').read()\nexcept PermissionError:\n    pass\nelse:\n    raise SystemExit('read shadow')\n")
    outcome = run_python(code, FAST)
    assert outcome.passed, outcome.detail


def _unix_server(path):
    """A Unix socket server anyone may connect to (mode 777), as /run/lock/x.sock was."""
    import socket

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    if not path.startswith("\0"):
        os.chmod(path, 0o777)
    server.listen(1)
    server.settimeout(0.3)
    return server


@namespaces
def test_no_unix_socket_on_the_host_is_reachable():
    """Socket files in a folder of the host's file system, in /run/lock (world-writable on most systems) and an
    abstract socket: the program connects to none of them, even from C (`_socket`), and the servers see nothing."""
    import socket

    home = Path(__file__).parent
    if str(home).startswith(("/tmp/", "/var/tmp/", "/dev/shm/", "/run/")):
        home = Path("/")
    folder = home / f".unskill-sandbox-sockets-{os.getpid()}"
    folder.mkdir(mode=0o755)
    paths = [str(folder / "x.sock"), f"\0unskill-sandbox-{os.getpid()}"]
    if os.access("/run/lock", os.W_OK):
        paths.append(f"/run/lock/unskill-sandbox-{os.getpid()}.sock")
    servers = []
    try:
        servers = [_unix_server(path) for path in paths]
        for path in paths:
            code = (f"import _socket\ns = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)\n"
                    f"s.connect({path!r})\ns.send(b'escaped')\n")
            outcome = run_python(code, FAST)
            assert not outcome.passed, path
        for server in servers:
            with pytest.raises(socket.timeout):
                server.accept()
        # the check is not vacuous: from the host the same code connects
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(paths[0])
    finally:
        for server in servers:
            server.close()
        for path in paths:
            if not path.startswith("\0") and os.path.exists(path):
                os.unlink(path)
        folder.rmdir()


@pytest.mark.parametrize("code", [
    "raise SystemExit(0)\nassert 1 == 2",
    "import sys\nsys.exit()\nassert 1 == 2",
    "import os\nos._exit(0)\nassert 1 == 2",
    "import atexit, os\natexit.register(lambda: os._exit(0))\nraise SystemExit(0)\nassert 1 == 2",
    "import atexit, posix\natexit.register(posix._exit, 0)\nassert 1 == 2",
    "import threading, os, time\nthreading.Thread(target=lambda: os._exit(0)).start()\ntime.sleep(5)\nassert 1 == 2",
    "import sys\nprint('\\n' * 3)\nsys.stdout.flush()\nimport os\nos._exit(0)",
])
def test_exits_before_the_asserts_score_as_failed(code):
    outcome = run_python(code, FAST)
    assert not outcome.passed and outcome.status == "failed", outcome


def test_a_program_that_reaches_its_end_passes_whatever_it_prints():
    code = "import sys, atexit\natexit.register(print, 'bye')\nprint('x' * 100000)\nsys.stderr.write('warn\\n')\nassert 1 + 1 == 2"
    assert run_python(code, FAST).passed
