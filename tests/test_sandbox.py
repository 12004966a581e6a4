"""The sandbox that runs model-written code (tridlm eval humaneval): each program below attacks it, and
passes only where the attack is stopped (or, for the runaways, must not pass at all)."""

import os
import secrets
import time
from pathlib import Path

import pytest

from tridlm.measure import sandbox
from tridlm.measure.sandbox import run_python

namespaces = pytest.mark.skipif(
    sandbox.isolation() != "namespaces", reason="this machine lets the sandbox use rlimits only (no unshare)"
)


def test_passes_exit_zero_only_and_stops_runaways():
    assert run_python("assert 1 + 1 == 2")
    assert not run_python("assert 1 + 1 == 3")
    assert not run_python("while True: pass", timeout=1)
    assert not run_python("import time; time.sleep(60)", timeout=1)
    assert not run_python("x = bytearray(8 << 30)")  # over the memory limit
    assert not run_python("import os; assert os.environ.get('HOME')")  # a clean environment


def test_an_early_exit_is_not_a_pass():
    for exit in ("exit(0)", "import sys; sys.exit()", "import os; os._exit(0)", "raise SystemExit(0)"):
        assert not run_python(f"{exit}\nassert False, 'the tests'"), exit
    assert run_python("def f():\n    return 1\nassert f() == 1")


def test_huge_output_is_capped_and_fails():
    start = time.perf_counter()
    assert not run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", timeout=5)
    assert time.perf_counter() - start < 5  # stopped by the file-size limit, not the timeout


@pytest.mark.skipif(
    sandbox.isolation() != "namespaces" and os.geteuid() == 0,
    reason="without namespaces the program runs as root, whom Linux exempts from the process limit",
)
def test_a_fork_bomb_is_contained():
    start = time.perf_counter()
    assert not run_python(
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", timeout=2
    )
    assert time.perf_counter() - start < 10
    assert run_python(
        "import os\nn = 0\nfor _ in range(500):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n"
        "        import time; time.sleep(5); os._exit(0)\n"
        f"    n += 1\nassert n < {sandbox.PROCESSES + 1}, n"
    )


@namespaces
def test_a_detached_grandchild_dies_with_the_program():
    token = secrets.token_hex(8)
    program = (
        "import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{token}'])\n"
        "    os._exit(0)\n"
    )
    assert run_python(program)
    time.sleep(0.5)
    alive = [p for p in Path("/proc").iterdir() if p.name.isdigit() and token in _cmdline(p)]
    assert not alive


@namespaces
def test_no_network():
    assert run_python(
        "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 22), timeout=2)\n"
        "except OSError:\n    pass\nelse:\n    raise SystemExit(1)"
    )
    assert run_python(
        "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\n"
        "except OSError:\n    pass\nelse:\n    raise SystemExit(1)"
    )


@namespaces
def test_no_view_of_the_parent():
    parent = os.getpid()
    assert run_python(
        f"try:\n    open('/proc/{parent}/environ').read()\nexcept OSError:\n    pass\n"
        "else:\n    raise SystemExit(1)\nimport os\nassert os.getppid() == 0"
    )  # pid 1 of its namespace


@namespaces
def test_writes_nothing_outside_its_folder(tmp_path):
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o777)  # were the filesystem writable, even nobody could write here
    assert run_python(
        f"try:\n    open({str(target)!r}, 'w').write('x')\nexcept OSError:\n    pass\n"
        "else:\n    raise SystemExit(1)\nopen('scratch.txt', 'w').write('its own folder is fine')"
    )
    assert not target.exists()


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
