"""`ray job submit` of a tiny sweep to a local head started with `ray start --head` (marked slow).

The head gets its own ports and temp folder and runs with `--block`, so stopping it (SIGTERM) ends
only that cluster, never the test session's Ray instance (`ray stop` would end every cluster).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def local_head(tmp_path_factory, free_port):
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        pytest.skip(f"no ray command beside {sys.executable}")
    # As in an activated virtual environment: the job's `python` is the one that has lmadda installed.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{ray_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([str(ray_cli), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    port, dashboard = free_port(), free_port()
    # Every port with a fixed default gets a free one: the test session's own Ray instance holds the
    # defaults (its dashboard agent on 52365), and a head whose agent cannot bind accepts no jobs.
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    temp = Path("/tmp") / f"ray-job-test-{os.getpid()}"  # Ray's socket paths must stay short
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", "--num-cpus=2", f"--port={port}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--temp-dir={temp}", "--disable-usage-stats", *agent_ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while subprocess.run([str(ray_cli), "job", "list", "--address", address], env=env, capture_output=True).returncode != 0:
        assert head.poll() is None, "ray start --head exited"
        assert time.monotonic() < deadline, "the local head's job server did not come up in 120 s"
        time.sleep(1)
    yield ray_cli, address, env
    os.killpg(head.pid, signal.SIGTERM)  # --block: ray start takes its cluster down with it
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def _submit(ray_cli: Path, address: str, env: dict, *command: str) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- <command>`, as README documents and the RayJob manifest runs. A head that
    has just started may answer before its job agent is up ("No available agent"): that, and only that, is retried."""
    deadline = time.monotonic() + 90
    while True:
        submitted = subprocess.run([str(ray_cli), "job", "submit", "--address", address, "--working-dir", str(REPO), "--", *command],
                                   env=env, capture_output=True, text=True, timeout=400)
        if "No available agent" not in submitted.stderr or time.monotonic() > deadline:
            return submitted
        time.sleep(3)


def test_ray_job_submit_runs_a_tiny_sweep_on_a_local_head(local_head, tiny_synth, tiny_source, tmp_path):
    """The README's command: the config's paths are relative, as in tune/configs/quick.yaml. In the job they would
    resolve inside Ray's uploaded copy of the repository: refused in one line, then run with --base-dir."""
    ray_cli, address, env = local_head
    config = {
        "name": "job", "storage_path": "sweeps", "source": {"checkpoint": os.path.relpath(tiny_source, tmp_path)},
        "data": {"manifest": os.path.relpath(tiny_synth.source, tmp_path), "source_setting": "phase_contrast"},
        "grid": {"targets": ["bright_field"], "layers": [2], "lrs": [1e-4], "paper_layers": []},
        "adapt": {"steps": 2, "batch_size": 2, "crop_size": 64, "log_every": 2, "gate_accuracy": None, "d_warmup_steps": 0},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 0.5},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    sweep = ["python", "-m", "lmadda_tune.sweep", "--config", str(path)]

    refused = _submit(ray_cli, address, env, *sweep)
    assert refused.returncode != 0
    assert "Ray's uploaded copy of the repository" in refused.stdout + refused.stderr and "--base-dir $PWD" in refused.stdout
    assert not (tmp_path / "sweeps").exists()

    submitted = _submit(ray_cli, address, env, *sweep, "--base-dir", str(tmp_path))
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "succeeded" in submitted.stdout
    rows = pq.read_table(tmp_path / "sweeps" / "job" / "points.parquet").to_pylist()
    assert [(r["layer"], r["steps_done"], r["collapsed"]) for r in rows] == [(2, 2, False)]
