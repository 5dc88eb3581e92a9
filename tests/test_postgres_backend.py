"""The MLflow server as deploy/ runs it, on a real PostgreSQL: the backend URI exactly in deploy's form
(`postgresql+psycopg2://`), a model registered through the server and served from it by the endpoint's cache.

Runs where PostgreSQL's server programs (initdb, pg_ctl) and psycopg2 are installed; skipped elsewhere with the
reason. The database and the server live in a temporary folder and stop with the module."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deploy" / "k8s" / "mlflow.yaml"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("initdb") and shutil.which("pg_ctl")),
                       reason="PostgreSQL's server programs (initdb, pg_ctl) are not on PATH: no database to test against"),
]


def _as_database_user(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: a root test session runs it as the system's postgres user
    if os.geteuid() != 0:
        return command
    if not shutil.which("runuser"):
        pytest.skip("running as root without runuser: PostgreSQL cannot be started as another user")
    return ["runuser", "-u", "postgres", "--", *command]


def deploy_backend_scheme() -> str:
    """The scheme of the backend URI that deploy/k8s/mlflow.yaml tells an operator to put in its Secret."""
    found = re.search(r"BACKEND_STORE_URI=([a-z0-9+]+)://", MANIFEST.read_text())
    assert found, f"{MANIFEST} no longer shows a BACKEND_STORE_URI example"
    return found.group(1)


@pytest.fixture(scope="module")
def postgres(free_port):
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install 'lmadda[cluster]'): MLflow cannot "
                                           "reach PostgreSQL through the driver deploy/ names")
    folder = Path(tempfile.mkdtemp(prefix="lmadda-postgres-"))  # not pytest's tmp_path: its parents are private to root
    data, sockets = folder / "data", folder / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        folder.chmod(0o755)
        shutil.chown(folder, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    subprocess.run(_as_database_user(["initdb", "-D", str(data), "-U", "lmadda", "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True)
    subprocess.run(_as_database_user(["pg_ctl", "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                                      f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1", "start"]),
                   check=True, capture_output=True)
    try:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user="lmadda", dbname="postgres")
        connection.autocommit = True  # CREATE DATABASE runs outside a transaction
        connection.cursor().execute("CREATE DATABASE mlflow")
        connection.close()
        yield f"{deploy_backend_scheme()}://lmadda@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(_as_database_user(["pg_ctl", "-D", str(data), "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory, free_port):
    """`mlflow server` with the arguments deploy/k8s/mlflow.yaml gives it (artifacts proxied, here to a local folder)."""
    artifacts = tmp_path_factory.mktemp("artifacts")
    port = free_port()
    log = (tmp_path_factory.mktemp("server") / "log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", postgres, "--artifacts-destination", artifacts.as_uri(),
                               "--serve-artifacts", "--workers", "1"],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # a fresh database is migrated on start
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"mlflow server on {postgres} did not start:\n{Path(log.name).read_text()[-3000:]}")
                time.sleep(1)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_deploy_names_the_driver_that_mlflows_sqlalchemy_needs():
    # a bare postgresql:// makes SQLAlchemy 2 look for psycopg 3, which neither deploy's image nor lmadda[cluster] installs
    assert deploy_backend_scheme() == "postgresql+psycopg2"


def test_a_model_registered_through_a_server_on_postgres_is_served_from_it(mlflow_server, tmp_path):
    import torch

    from lmadda.checkpoint import GeneratorCheckpoint, save_checkpoint
    from lmadda.core.registry_names import file_sha256
    from lmadda.models import GeneratorConfig, UNetGenerator
    from lmadda_serve.registry import StainModels
    from lmadda.sweep.promotion import register_checkpoint

    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(in_channels=1, out_channels=1, ngf=2, depth=6))
    path = save_checkpoint(tmp_path / "generator.pt", GeneratorCheckpoint(generator=generator, markers=["dapi"], setting="bright_field"))
    registered = register_checkpoint(mlflow_server, path, "dapi", "bright_field")

    assert registered["alias"] == "bright_field" and registered["serving"]

    # what the endpoint does: resolve the alias through the server, download through its proxy, check the SHA-256
    models = StainModels(mlflow_server, tmp_path / "cache")
    assert models.registered_sha256(registered["model"], registered["version"]) == file_sha256(path)
    served = models.load(f"{registered['model']}/{registered['version']}")
    assert served.markers == ["dapi"]
    expected = generator.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in served.generator.state_dict().items())
