"""serve/config.yaml is a valid Serve config and `lmadda serve` reads the same application from it."""

import pytest
import yaml

from lmadda.core.errors import LmaddaError
from lmadda_serve.local import DEFAULT_CONFIG, read_serve_config


def test_the_shipped_serve_config_validates_with_rays_own_schema():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.parse_obj(yaml.safe_load(DEFAULT_CONFIG.read_text()))
    assert [app.import_path for app in schema.applications] == ["lmadda_serve.app:build_app"]


def test_lmadda_serve_reads_args_and_deployment_options_from_it():
    from lmadda_serve.app import ARG_NAMES

    config = read_serve_config()
    assert set(config["args"]) <= set(ARG_NAMES)
    assert config["deployment"]["autoscaling_config"]["max_replicas"] >= 1


def test_unknown_args_and_foreign_configs_are_refused(tmp_path):
    from lmadda_serve.app import check_args

    with pytest.raises(ValueError, match="unknown serve args \\['tiel'\\]"):
        check_args({"tiel": 256})
    other = tmp_path / "other.yaml"
    other.write_text("applications: [{name: x, import_path: other.app:build}]")
    with pytest.raises(LmaddaError, match="lmadda_serve.app:build_app"):
        read_serve_config(other)


def test_serve_host_help_says_a_non_loopback_address_needs_a_token(capsys):
    from lmadda.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "LMADDA_SERVE_TOKEN" in help_text and "allow_unauthenticated: true" in help_text


def test_lmadda_serve_without_a_token_makes_one_before_ray_starts_and_shows_it_once(monkeypatch, capsys):
    import os
    import sys

    from lmadda.cli import main
    from lmadda_serve.auth import token_digest, token_file

    monkeypatch.setenv("LMADDA_SERVE_TOKEN", "")  # restored after the test, whatever lmadda serve sets
    monkeypatch.setitem(sys.modules, "ray", None)  # importing ray fails: the token must be made before it
    with pytest.raises(ModuleNotFoundError):
        main(["serve", "--host", "0.0.0.0"])
    token = token_file().read_text().strip()
    out = capsys.readouterr().out
    assert "auth ON: made a token" in out and token in out and os.environ["LMADDA_SERVE_TOKEN"] == token
    monkeypatch.delenv("LMADDA_SERVE_TOKEN")  # a new shell
    with pytest.raises(ModuleNotFoundError):
        main(["serve"])
    again = capsys.readouterr().out
    assert "auth ON: the token stored in" in again and token not in again and token_digest(token) not in again


def test_serve_args_are_typed_from_the_deployments_own_signature():
    from lmadda_serve.app import check_args

    config = read_serve_config()
    assert check_args(config["args"]) == config["args"]  # the shipped args validate as they are
    with pytest.raises(ValueError, match="serve arg tile is 'big': Input should be a valid integer"):
        check_args({"tile": "big"})


def test_without_a_registry_named_anywhere_serve_refuses_before_serve_starts(monkeypatch):
    """No tracking_uri in the args and no $MLFLOW_TRACKING_URI: one line naming the ways to give one, not a guessed
    ./demo-out store (which would serve whatever models sit in the working directory)."""
    import ray

    from lmadda_serve.app import default_tracking_uri
    from lmadda_serve.local import start_local

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LMADDA_SERVE_TOKEN", "a-token-for-this-test")
    with pytest.raises(LmaddaError, match="no model registry: set tracking_uri .*MLFLOW_TRACKING_URI.*--tracking-uri"):
        default_tracking_uri()
    was_running = ray.is_initialized()
    with pytest.raises(LmaddaError, match="no model registry"):
        start_local(host="127.0.0.1", port=1)
    assert ray.is_initialized() == was_running  # refused before Serve (and Ray) started
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/registry.db")
    assert default_tracking_uri() == "sqlite:////tmp/registry.db"


def test_serve_demo_stains_its_image_with_the_token_as_any_client_must(monkeypatch, tmp_path):
    """`make demo` ends with `lmadda serve --demo`; with auth on by default its own request must carry the token (it sent
    none, and the endpoint answered 401). A stand-in endpoint that, like the real one, refuses a request without it."""
    import http.server
    import threading

    from lmadda.cli.serve_commands import _stain_demo_image

    seen = []

    class Endpoint(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.headers.get("Authorization"))
            ok = self.headers.get("Authorization") == "Bearer demo-token"
            body = b"II*\x00stain" if ok else b'{"error": "missing or wrong bearer token"}'
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        image = tmp_path / "demo.tif"
        image.write_bytes(b"II*\x00image")
        monkeypatch.setenv("LMADDA_SERVE_TOKEN", "demo-token")  # what `lmadda serve` put in its environment (announce_token)
        assert _stain_demo_image(f"http://127.0.0.1:{server.server_port}", image, "phase_contrast-overexposure-2_5") == 0
    finally:
        server.shutdown()
    assert seen == ["Bearer demo-token"]
    assert (tmp_path / "demo.phase_contrast-overexposure-2_5.dapi_cd29.tif").read_bytes() == b"II*\x00stain"
