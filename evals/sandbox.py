"""Run generated code (MBPP pass@1) in a child Python that can do little harm and leaves nothing behind.

Layers, each cheap; together they stop the accidents a small model writes (endless loops, memory
blow-ups, fork bombs, stray files, network calls) and the escapes a hostile program tries:
  - a fresh temporary directory as cwd, deleted afterwards whatever happened;
  - namespaces (util-linux `unshare`, installed everywhere util-linux is): its own mount, PID, network,
    IPC and UTS namespaces, and as root also a switch to the unprivileged user `nobody` (setpriv) inside
    its own user namespace. In the mount namespace the whole file system is read-only except the work
    dir (seen as /tmp/work) and fresh scratch tmpfs on /tmp, /var/tmp, /dev/shm and /run (the host's Unix
    sockets live there; abstract ones belong to the network namespace); /etc/passwd and
    /etc/group hold only root and nobody. The program's PID namespace dies with it, so children it
    leaves behind (setsid included) die too. No network device is up;
  - `python -I` (isolated: no user site, no PYTHON* variables) with an empty environment;
  - its own session, so a timeout kills the whole process group;
  - rlimits: address space, CPU seconds, file size, open files, processes;
  - a prelude that disables sockets, process spawning and signalling, and refuses writes and deletes
    outside the work dir, before the code runs (Python-level guards: they give clear messages, the
    namespaces hold when C-level calls get past them), and a seccomp filter: socket() of any family but
    IPv4/IPv6 fails, so no Unix socket file anywhere on the host can be reached, even from C;
  - a verdict from the program's end only: the harness writes a random per-run marker after its last line
    (the asserts), so an exit before them (SystemExit, os._exit, atexit) scores as failed.
Without namespaces (no `unshare`, or a kernel that refuses them) only the last four layers remain; see
`isolation()`. This is not a VM.
"""

from __future__ import annotations

import functools
import os
import resource
import secrets
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
def _no_local_sockets():
    """seccomp: socket() of any family but IPv4/IPv6 fails with EPERM (IPv4/IPv6 meet a network namespace with
    no device up); so does io_uring, and any syscall of another ABI. A Unix socket file anywhere on the host,
    or an abstract one, cannot be reached even from C. Best effort: a kernel without seccomp keeps the rest."""
    import ctypes, struct
    arch, socket_nr = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}.get(_os.uname().machine, (0, 0))
    if not arch:
        return
    deny, allow = 0x00050001, 0x7FFF0000   # SECCOMP_RET_ERRNO | EPERM, SECCOMP_RET_ALLOW
    program = [(0x20, 0, 0, 4), (0x15, 0, 7, arch), (0x20, 0, 0, 0), (0x35, 5, 0, 0x40000000),
               (0x15, 4, 0, 425), (0x15, 0, 4, socket_nr), (0x20, 0, 0, 16), (0x15, 2, 0, 2), (0x15, 1, 0, 10),
               (0x06, 0, 0, deny), (0x06, 0, 0, allow)]
    code = b"".join(struct.pack("HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(code)
    fprog = struct.pack("HxxxxxxP", len(program), ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(38, 1, 0, 0, 0)                    # PR_SET_NO_NEW_PRIVS
    libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0)   # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
try:
    _no_local_sockets()
except Exception:
    pass
del _no_local_sockets
'''

# Runs the program under test and says "passed" only when it reached its end: the runner sends a random marker on
# stdin, this reads it before the program starts (stdin is then closed) and writes it after the program's last
# line. An exit before the asserts (SystemExit, os._exit, an atexit hook) never writes it. The marker lives in
# this frame only; a program that searches the interpreter's frames for it is out of scope (this is a harness
# for generated answers, not a jail for an adversary with a debugger).
HARNESS = '''
def _unskill_run():
    import builtins, os, sys
    write, leave, marker = os.write, os._exit, os.read(0, 64)
    os.close(0)
    with open("candidate.py", encoding="utf-8") as handle:
        program = compile(handle.read(), "candidate.py", "exec")
    try:
        exec(program, {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as exc:
        sys.stderr.write(f"SystemExit: the program exited ({exc.code!r}) before its tests finished\\n")
        sys.stderr.flush()
        leave(1)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    write(1, b"\\n" + marker + b"\\n")
    leave(0)
_unskill_run()
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


# Runs as root inside the new namespaces: $1 work dir, $2 python, $3 script, $4 "drop" to become nobody.
SETUP = r"""
set -e
cd "$1"
mount -t tmpfs -o mode=1777,size=64m unskill-tmp /tmp
mkdir -p /tmp/work /tmp/.etc
mount --no-canonicalize --bind . /tmp/work
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/tmp/work:/usr/sbin/nologin\n' > /tmp/.etc/passwd
printf 'root:x:0:\nnogroup:x:65534:\n' > /tmp/.etc/group
chmod 755 /tmp/.etc && chmod 644 /tmp/.etc/passwd /tmp/.etc/group
mount --bind /tmp/.etc/passwd /etc/passwd
mount --bind /tmp/.etc/group /etc/group
for point in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do
  case "$point" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*|/tmp|/tmp/*) continue;; esac
  mount -o remount,bind,ro "$point" 2>/dev/null || true
done
for scratch in /var/tmp /dev/shm /run /var/run; do   # /run: the host's Unix sockets (docker, dbus, /run/lock)
  [ -d "$scratch" ] && [ ! -L "$scratch" ] && mount -t tmpfs -o size=16m unskill-scratch "$scratch" || true
done
cd /tmp/work
if [ "$4" = drop ]; then
  setpriv --reuid=65534 --regid=65534 --clear-groups --no-new-privs unshare --user "$2" -I -B "$3"
else
  "$2" -I -B "$3"
fi
"""


def _reachable_by_others(path: str) -> bool:
    """Whether `nobody` can run this interpreter: every folder above it searchable by others."""
    real = os.path.realpath(path)
    folders = [real] + [os.path.dirname(real)]
    while folders[-1] != "/":
        folders.append(os.path.dirname(folders[-1]))
    return os.path.isfile(real) and all(os.stat(f).st_mode & 0o001 for f in folders)


def _interpreter() -> str:
    """This Python where nobody can run it, else a system python3 of the same version (MBPP needs stdlib only)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}", "/usr/bin/python3"):
        if candidate and _reachable_by_others(candidate):
            return os.path.realpath(candidate)
    return os.path.realpath(sys.executable)


def _namespace_command(workdir: str, script: str, python: str, as_root: bool) -> list[str]:
    unshare = shutil.which("unshare") or "unshare"
    flags = ["--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc",
             "--propagation", "private"]
    if not as_root:
        flags = ["--user", "--map-root-user", *flags]
    return [unshare, *flags, "/bin/sh", "-c", SETUP, "sh", workdir, python, script, "drop" if as_root else "keep"]


@functools.lru_cache(maxsize=1)
def isolation() -> str:
    """"namespaces+nobody" (root), "namespaces" (user namespaces), "net" (`unshare --net` only) or "none",
    whichever works on this machine: tried once with a program that checks it is really isolated."""
    python = _interpreter()
    as_root = os.geteuid() == 0
    probe = "import os\nassert os.getcwd() == '/tmp/work' and os.getpid() < 100\n"
    if shutil.which("unshare") and shutil.which("setpriv" if as_root else "unshare"):
        workdir = tempfile.mkdtemp(prefix="unskill-sandbox-")
        try:
            with open(os.path.join(workdir, "probe.py"), "w") as handle:
                handle.write(probe)
            _hand_over(workdir, as_root)
            command = _namespace_command(workdir, "probe.py", python, as_root)
            if subprocess.run(command, capture_output=True, timeout=30).returncode == 0:
                return "namespaces+nobody" if as_root else "namespaces"
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return "net" if _net_namespace_prefix() else "none"


def _hand_over(workdir: str, as_root: bool) -> None:
    """As root the program runs as nobody: give it its work dir (and only that)."""
    if as_root:
        for root, folders, files in os.walk(workdir):
            for name in [root, *(os.path.join(root, f) for f in folders + files)]:
                os.chown(name, 65534, 65534)


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
    """Runs code after PRELUDE (in HARNESS); passed means it ran to its last line (the marker came back) and
    exited 0 within the limits."""
    workdir = tempfile.mkdtemp(prefix="unskill-sandbox-")
    marker = secrets.token_hex(24).encode()
    try:
        script = os.path.join(workdir, "program.py")
        with open(script, "w", encoding="utf-8") as handle:
            handle.write(PRELUDE + HARNESS)
        with open(os.path.join(workdir, "candidate.py"), "w", encoding="utf-8") as handle:
            handle.write(code + "\n")
        mode = isolation()
        home = workdir
        if mode.startswith("namespaces"):
            as_root, home = mode == "namespaces+nobody", "/tmp/work"   # where the work dir is seen inside
            _hand_over(workdir, as_root)
            command = _namespace_command(workdir, "program.py", _interpreter(), as_root)
        else:
            command = [*_net_namespace_prefix(), sys.executable, "-I", "-B", script]
        # stdout and stderr go to files outside the work dir (the program cannot rewrite them), not pipes: a
        # pipe held open by a left-behind child would keep us waiting. The marker goes in through a pipe.
        with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
            proc = subprocess.Popen(command, cwd=workdir, env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
                                                               "HOME": home, "TMPDIR": home},
                                    stdin=subprocess.PIPE, stdout=stdout, stderr=stderr,
                                    start_new_session=True, preexec_fn=lambda: _set_limits(limits))
            try:
                proc.stdin.write(marker)
                proc.stdin.close()
            except OSError:   # it died before reading it
                pass
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                return Outcome(False, "timeout", f"over {limits.timeout_s:g} s")
            finally:
                _kill_group(proc)   # on timeout, and anything it left running in its session
            stderr.seek(0)
            lines = stderr.read().decode("utf-8", "replace").strip().splitlines()
            reached_end = _tail(stdout).endswith(b"\n" + marker + b"\n")
        if proc.returncode == 0 and reached_end:
            return Outcome(True, "passed")
        if proc.returncode == 0:
            return Outcome(False, "failed", "the program exited before its tests finished")
        return Outcome(False, "failed", lines[-1][:200] if lines else f"exit status {proc.returncode}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _tail(handle, size: int = 4096) -> bytes:
    """The last bytes the program wrote (the marker is its last write)."""
    handle.seek(0, os.SEEK_END)
    handle.seek(max(0, handle.tell() - size))
    return handle.read()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def mbpp_program(code: str, tests: tuple[str, ...], setup: str = "") -> str:
    """The candidate, then the setup code and the asserts, as the MBPP paper runs them."""
    return "\n".join([code, setup, *tests])
