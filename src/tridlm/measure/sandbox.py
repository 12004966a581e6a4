"""Running untrusted Python (a model's answer to a coding problem) so that it reaches nothing beyond one
temporary folder, for a few seconds, and is scored only if it runs to its end.

Where Linux lets this process make namespaces (``unshare``: as root, or with unprivileged user namespaces)
the program runs in new mount, network and PID namespaces: no network (a loopback that is down), a /proc
that shows only its own processes (not the parent's environment), every filesystem read-only but its
folder, no capabilities, and, when started as root, as the unprivileged user nobody (so that the process
limit holds: Linux exempts root from it). The PID namespace ends with the program: a detached grandchild
ends with it. Everywhere: its own session and process group, killed whole on timeout; limits on
processes, memory, CPU time, file size and open files; output kept in a file that the file-size limit
caps, of which only the tail is read. Where namespaces are unavailable only the "everywhere" part holds
(``isolation()`` says which).
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
from pathlib import Path

NOBODY = 65534
PROCESSES = 64  # processes the program may run at once (besides what its user runs already)
MEMORY = 2 << 30  # bytes of address space per process
FILE_SIZE = 16 << 20  # bytes per file it writes, its output included
OPEN_FILES = 64

# Run by sh as root of the new namespaces: the folder stays writable (and the Python install is bound into
# it, readable by nobody), everything else becomes read-only, then the program runs with no capabilities.
_SETUP = r"""
set -eu
dir=$1; python_root=$2; shift 2
mount --make-rprivate /
mount --bind "$dir" "$dir"
mkdir "$dir/.python"
mount --bind "$python_root" "$dir/.python"
awk '{print $5}' /proc/self/mountinfo | while read -r point; do
  [ "$point" = "$dir" ] || mount -o remount,bind,ro "$point" 2>/dev/null || true
done
cd "$dir"  # the writable mount over the folder, not the folder beneath it
exec setpriv --no-new-privs --inh-caps=-all --bounding-set=-all "$@"
"""


@functools.cache
def isolation() -> str:
    """ "namespaces" where the program runs in its own mount, network and PID namespaces, else "rlimits"."""
    if not sys.platform.startswith("linux") or not (shutil.which("unshare") and shutil.which("setpriv")):
        return "rlimits"
    with tempfile.TemporaryDirectory() as folder:
        try:
            done = subprocess.run(
                _command(folder, ["true"]),
                cwd=folder,
                env=_ENV,
                capture_output=True,
                timeout=30,
                check=False,
                preexec_fn=_limits(30),
            )
        except (OSError, subprocess.TimeoutExpired):
            return "rlimits"
    return "namespaces" if done.returncode == 0 else "rlimits"


_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def _python() -> tuple[str, str]:
    """(the interpreter's install folder, the interpreter's path inside it): bound into the sandbox's folder,
    because the install may sit where nobody cannot read (root's home)."""
    root = sys.base_prefix
    binary = os.path.realpath(sys.executable)
    inside = os.path.relpath(binary, root)
    return (root, inside) if not inside.startswith("..") else (os.path.dirname(binary), os.path.basename(binary))


def _command(folder: str, program: list[str]) -> list[str]:
    root = os.geteuid() == 0
    user = ["--user", "--map-root-user"] if not root else []
    drop = ["--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"] if root else []
    python_root, _ = _python()
    return [
        "unshare",
        *user,
        "--mount",
        "--net",
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child",
        "sh",
        "-c",
        _SETUP,
        "sandbox",
        folder,
        python_root,
        *drop,
        "--",
        *program,
    ]


def _limits(seconds: float):
    """Resource limits of a sandboxed program, set in the child before exec (inherited by what it starts)."""
    uid = os.getuid()
    own = 0 if uid == 0 else sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _owner(p) == uid)

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
        resource.setrlimit(resource.RLIMIT_CPU, (int(seconds) + 1, int(seconds) + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE, FILE_SIZE))
        resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (own + PROCESSES, own + PROCESSES))

    return apply


def _owner(path: Path) -> int | None:
    try:
        return path.stat().st_uid
    except OSError:
        return None


def run_python(program: str, timeout: float = 10.0) -> bool:
    """Whether a Python program runs to its end and exits 0, run isolated (``-I``) in an empty temporary
    folder with a clean environment, under the limits above and a wall-clock timeout. Its end is proven by
    echoing a random marker from stdin after its last line: a program that exits early (``exit(0)`` before
    its tests) never echoes it."""
    marker = secrets.token_hex(16)
    tail = "\n\nimport sys as _sys\n_sys.stdout.write(_sys.stdin.read())\n"
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o777)  # nobody writes here
        (Path(folder) / "program.py").write_text(program + tail)
        if isolation() == "namespaces":
            command = _command(folder, [f"{folder}/.python/{_python()[1]}", "-I", "program.py"])
        else:
            command = [sys.executable, "-I", "program.py"]
        with open(Path(folder) / "output", "w+b") as output:
            proc = subprocess.Popen(
                command,
                cwd=folder,
                env=_ENV,
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=subprocess.DEVNULL,
                preexec_fn=_limits(timeout),
                start_new_session=True,
            )
            try:
                proc.communicate(marker.encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            finally:
                _kill_group(proc)
            output.seek(max(0, output.seek(0, os.SEEK_END) - len(marker)))
            ended = output.read().decode(errors="replace") == marker
    return proc.returncode == 0 and ended


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the program's process group (in a PID namespace, its end takes every process in it along)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
