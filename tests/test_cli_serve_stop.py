"""`lmadda serve` stops whole on SIGTERM as on Ctrl-C: no process of its local Ray instance outlives it (slow)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _process_table() -> dict[int, list[tuple[int, str]]]:
    """parent pid -> [(pid, start time)] from /proc (the start time tells a reused pid apart)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, ..., starttime (field 22)
            children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    return children


def _descendants(pid: int) -> list[tuple[int, str]]:
    table, found, todo = _process_table(), [], [pid]
    while todo:
        for child in table.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _running(pid: int, start: str) -> bool:
    try:
        fields = (lambda s: s[s.rindex(")") + 2:].split())(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return False
    return fields[19] == start and fields[0] != "Z"


def _py_spy() -> str | None:
    """py-spy beside this Python, or on PATH (a developer's diagnostic; not a dependency)."""
    import shutil

    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return "?"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc (Linux)")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_serve_leaves_no_ray_process_behind(tmp_path, stop, free_port):
    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "lmadda", "serve", "--port", str(port), "--num-cpus", "1",
                              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).parents[1])
    ray_processes = []
    try:
        for line in serve.stdout:
            if "stops it" in line:
                break
        else:
            pytest.fail(f"lmadda serve ended before it served (exit {serve.wait()})")
        ray_processes = _descendants(serve.pid)
        assert any("raylet" in _name(pid) for pid, _ in ray_processes)  # the local instance is its own
        serve.send_signal(stop)
        try:
            output = serve.communicate(timeout=120)[0]
        except subprocess.TimeoutExpired:  # say where it hangs: its output and the Python stacks of the stuck process
            spy = _py_spy()
            stacks = subprocess.run([spy, "dump", "--pid", str(serve.pid)], capture_output=True, text=True,
                                    timeout=60).stdout if spy else "(py-spy not installed: no stacks)"
            serve.kill()
            pytest.fail(f"lmadda serve did not stop within 120 s of {stop.name}.\nIts stacks:\n{stacks[-4000:]}\n"
                        f"Its output:\n{serve.communicate()[0][-3000:]}")
        assert serve.returncode == 130, output[-2000:]  # interrupted, not aborted (-6) by Ray's own SIGTERM handler
        deadline = time.monotonic() + 30
        while (left := [(pid, _name(pid)) for pid, start in ray_processes if _running(pid, start)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"still running after lmadda serve stopped: {left}"
    finally:
        if serve.poll() is None:
            serve.kill()
        for pid, start in ray_processes:  # whatever the outcome, nothing of this test keeps running
            if _running(pid, start):
                os.kill(pid, signal.SIGKILL)
