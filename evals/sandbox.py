"""Run generated code (MBPP pass@1) in a child Python that can do little harm and leaves nothing behind.

Layers, each cheap; together they stop the accidents a small model writes (endless loops, memory
blow-ups, fork bombs, stray files, network calls). This is not a VM; do not run hostile code with it.
  - a fresh temporary directory as cwd, deleted afterwards whatever happened;
  - `python -I` (isolated: no user site, no PYTHON* variables) with an empty environment;
  - its own session, so a timeout kills the whole process group;
  - rlimits: address space, CPU seconds, file size, open files, processes;
  - no network: inside `unshare --net` where the kernel allows it; and in any case a prelude that
    disables sockets, process spawning and signalling, and refuses writes and deletes outside the work
    dir, before the code runs (Python-level guards: code that imports C modules can get past them).
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

PRELUDE = '''\
import os as _os, socket as _socket, subprocess as _subprocess
def _blocked(*args, **kwargs):
    raise PermissionError("blocked by the unskill sandbox")
for _name in ("socket", "create_connection", "create_server", "socketpair", "fromfd"):
    setattr(_socket, _name, _blocked)
for _name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "posix_spawn", "posix_spawnp",
              "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
              "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe"):
    if hasattr(_os, _name):
        setattr(_os, _name, _blocked)
_subprocess.Popen = _blocked
import builtins as _builtins, io as _io, shutil as _shutil
_HOME = _os.path.realpath(_os.getcwd())
def _inside(path):
    real = _os.path.realpath(_os.fspath(path)) if not isinstance(path, int) else _HOME
    return real == _HOME or real.startswith(_HOME + _os.sep)
def _guard_path(func, writes=lambda *a, **k: True):
    def guarded(path, *args, **kwargs):
        if writes(*args, **kwargs) and not _inside(path):
            raise PermissionError(f"blocked by the unskill sandbox: {path!r} is outside the work dir")
        return func(path, *args, **kwargs)
    return guarded
def _open_writes(mode="r", *args, **kwargs):
    return any(flag in mode for flag in "wax+")
def _os_open_writes(flags, *args, **kwargs):
    return bool(flags & (_os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_APPEND | _os.O_TRUNC))
_builtins.open = _io.open = _guard_path(_io.open, _open_writes)
_os.open = _guard_path(_os.open, _os_open_writes)
for _name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
              "chmod", "chown", "mkdir", "makedirs", "symlink", "link", "utime"):
    if hasattr(_os, _name):
        setattr(_os, _name, _guard_path(getattr(_os, _name)))
_shutil.rmtree = _guard_path(_shutil.rmtree)
del _name
'''


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    open_files: int = 64
    processes: int = 64          # RLIMIT_NPROC counts the user's processes; root is exempt from it


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str                  # passed | failed | timeout
    detail: str = ""             # last line of stderr, for a failure


@functools.lru_cache(maxsize=1)
def _net_namespace_prefix() -> tuple[str, ...]:
    """`unshare --net` (as root) or `unshare -rn` (user namespaces) when either works here."""
    unshare = shutil.which("unshare")
    for prefix in ((unshare, "--net"), (unshare, "-rn")) if unshare else ():
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            pass
    return ()


def _set_limits(limits: Limits) -> None:
    cpu = int(limits.timeout_s) + 1
    for name, value in ((resource.RLIMIT_AS, limits.memory_bytes), (resource.RLIMIT_CPU, cpu),
                        (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NOFILE, limits.open_files),
                        (resource.RLIMIT_NPROC, limits.processes), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(name, (value, value))


def run_python(code: str, limits: Limits = Limits()) -> Outcome:
    """Runs PRELUDE + code; passed means exit status 0 within the limits."""
    workdir = tempfile.mkdtemp(prefix="unskill-sandbox-")
    try:
        script = os.path.join(workdir, "program.py")
        with open(script, "w", encoding="utf-8") as handle:
            handle.write(PRELUDE + code + "\n")
        command = [*_net_namespace_prefix(), sys.executable, "-I", "-B", script]
        # stderr goes to a file, not a pipe: a pipe held open by a left-behind child would keep us waiting.
        with open(os.path.join(workdir, ".stderr"), "w+b") as stderr:
            proc = subprocess.Popen(command, cwd=workdir, env={"PATH": "/usr/bin:/bin", "HOME": workdir,
                                                               "TMPDIR": workdir},
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                    start_new_session=True, preexec_fn=lambda: _set_limits(limits))
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                return Outcome(False, "timeout", f"over {limits.timeout_s:g} s")
            finally:
                _kill_group(proc)   # on timeout, and anything it left running in its session
            stderr.seek(0)
            lines = stderr.read().decode("utf-8", "replace").strip().splitlines()
        if proc.returncode == 0:
            return Outcome(True, "passed")
        return Outcome(False, "failed", lines[-1][:200] if lines else f"exit status {proc.returncode}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def mbpp_program(code: str, tests: tuple[str, ...], setup: str = "") -> str:
    """The candidate, then the setup code and the asserts, as the MBPP paper runs them."""
    return "\n".join([code, setup, *tests])
