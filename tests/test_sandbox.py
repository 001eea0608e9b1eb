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
