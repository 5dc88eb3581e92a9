"""The staining endpoint on a real Ray Serve instance, models from a temporary MLflow registry (slow)."""

import io
import json
import os
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
import tifffile
import torch

pytestmark = pytest.mark.slow
TOKEN = "test-token-123"


def _register(client, tracking_uri, path, marker_models, alias):
    """Log `path` as a run's generator artifact; register it under each model and point `alias` at it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("serve-test")  # not the active experiment of an earlier test's store
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(path), artifact_path="generator")
    versions = {}
    for name in marker_models:
        try:
            client.create_registered_model(name)
        except mlflow.exceptions.MlflowException:
            pass
        version = client.create_model_version(name, f"runs:/{run.info.run_id}/generator/{path.name}", run_id=run.info.run_id)
        client.set_registered_model_alias(name, alias, version.version)
        versions[name] = version.version
    return versions


def _post(url, body, content_type="image/tiff", token=TOKEN):
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def _get(url, token=TOKEN):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _tiff(array) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def endpoint(ray_session, tiny_source, tmp_path_factory, free_port):
    from mlflow.tracking import MlflowClient
    from ray import serve

    from lmadda.checkpoint import load_checkpoint, save_checkpoint
    from lmadda_serve.app import StainService
    from lmadda_serve.proxy import proxy_env

    root = tmp_path_factory.mktemp("serve")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    # A second model: the source with perturbed weights, so the two settings give different stains.
    other = load_checkpoint(tiny_source)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in other.generator.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    other_path = save_checkpoint(root / "other" / "generator.pt", other)
    corrupt = root / "corrupt" / "generator.pt"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"not a checkpoint")
    models = ["lmadda-dapi", "lmadda-cd29"]
    _register(client, tracking_uri, tiny_source, models, "phase_contrast")
    _register(client, tracking_uri, other_path, models, "bright_field")

    port = free_port()
    serve.shutdown()  # a Serve instance left by another module would keep its proxies, without the guard
    serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options={"runtime_env": {"env_vars": proxy_env(1, 3)}})
    # Serve's admission limits, small: 3 requests on the replica, 2 waiting for it, then 503 with Retry-After.
    service = StainService.options(max_ongoing_requests=3, max_queued_requests=2, backpressure_config={"retry_after_s": 1},
                                   ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": {"LMADDA_SERVE_TOKEN": TOKEN}}})
    serve.run(service.bind(tracking_uri, cache_dir=str(root / "cache"), refresh_s=3600, max_body_mb=1, body_timeout_s=3, tile=64, max_in_flight=2),
              name="lmadda-test", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "client": client, "tracking_uri": tracking_uri,
           "paths": {"phase_contrast": tiny_source, "bright_field": other_path}, "other": other_path, "corrupt": corrupt, "root": root}
    serve.delete("lmadda-test")
    serve.shutdown()


def _expected(checkpoint_path, image, tmp_path, marker_index):
    from lmadda.inference import predict_file

    tifffile.imwrite(tmp_path / "in.tif", image)
    predict_file(checkpoint_path, tmp_path / "in.tif", tmp_path / "out.tif", tile=64, overlap=0.25, device="cpu")
    out = tifffile.imread(tmp_path / "out.tif")
    return out[marker_index] if out.ndim == 3 else out


def test_stains_match_lmadda_predict_for_each_setting_marker_and_size(endpoint, tmp_path):
    rng = np.random.default_rng(0)
    for size in [(64, 64), (100, 72)]:
        image = rng.integers(0, 4000, size=size).astype(np.uint16)
        for setting, path in endpoint["paths"].items():
            status, headers, body = _post(f"{endpoint['url']}/v1/stain?setting={setting}&marker=dapi,cd29", _tiff(image))
            assert status == 200, body
            stains = tifffile.imread(io.BytesIO(body))
            assert stains.shape == (2, *size) and stains.dtype == np.uint16
            assert headers["x-lmadda-markers"] == "dapi,cd29" and headers["x-lmadda-setting"] == setting
            for index in range(2):
                expected = _expected(path, image, tmp_path, index)
                assert np.abs(stains[index].astype(int) - expected.astype(int)).max() <= 1  # rounding at .5 only


def test_bad_requests_get_clear_statuses(endpoint):
    url, image = endpoint["url"], _tiff(np.zeros((64, 64), np.uint16))
    cases = [
        (_post(f"{url}/v1/stain?setting=bright_field", image, token=None), 401, "bearer token"),
        (_post(f"{url}/v1/stain?setting=bright_field", image, "text/plain"), 415, "image/tiff"),
        (_post(f"{url}/v1/stain?setting=bright_field", b"\x00" * (2**20 + 1)), 413, "limit"),
        (_post(f"{url}/v1/stain?setting=bright_field", b"garbage"), 400, "cannot read image"),
        (_post(f"{url}/v1/stain?setting=bright_field", b""), 400, "0 bytes"),
        (_post(f"{url}/v1/stain?setting=bright_field", _tiff(np.full((64, 64), np.inf, np.float32))), 400, "NaN or infinite"),
        (_post(f"{url}/v1/stain?setting=bright_field", _tiff(np.zeros((64, 64, 3), np.uint8))), 400, "channel"),
        (_post(f"{url}/v1/stain?setting=widefield", image), 404, "bright_field, phase_contrast"),
        (_post(f"{url}/v1/stain?setting=..%2Fetc", image), 400, "not a valid name"),
        (_post(f"{url}/v1/stain?setting=bright_field&marker=gfp", image), 404, "served markers: cd29, dapi"),
    ]
    for (status, _, body), expected, words in cases:
        assert status == expected and words in body.decode(), (expected, body)


def test_models_health_and_a_promoted_champion_served_after_reload(endpoint, tmp_path):
    url, client = endpoint["url"], endpoint["client"]
    status, body = _get(f"{url}/v1/models")
    assert status == 200 and b'"setting":"bright_field"' in body and b'"uri":"models:/lmadda-dapi@phase_contrast"' in body
    assert _get(f"{url}/healthz", token=None)[0] == 200 and _get(f"{url}/readyz", token=None)[0] == 200
    assert _get(f"{url}/docs", token=None)[0] == 200  # the OpenAPI page

    image = np.random.default_rng(1).integers(0, 4000, size=(64, 64)).astype(np.uint16)
    before = _post(f"{url}/v1/stain?setting=phase_contrast&marker=dapi", _tiff(image))
    # Promote the other generator for phase contrast: served after a reload, without a restart.
    version = client.create_model_version("lmadda-dapi", client.get_model_version("lmadda-dapi", "2").source)
    client.set_registered_model_alias("lmadda-dapi", "phase_contrast", version.version)
    assert _post(f"{url}/v1/reload", b"", "application/json")[0] == 200
    after = _post(f"{url}/v1/stain?setting=phase_contrast&marker=dapi", _tiff(image))
    assert before[1]["x-lmadda-models"] == "lmadda-dapi/1" and after[1]["x-lmadda-models"] == f"lmadda-dapi/{version.version}"
    expected = _expected(endpoint["other"], image, tmp_path, 0)
    assert np.abs(tifffile.imread(io.BytesIO(after[2])).astype(int) - expected.astype(int)).max() <= 1

    # A champion that cannot load: the previous version keeps serving.
    _register(client, endpoint["tracking_uri"], endpoint["corrupt"], ["lmadda-dapi"], "phase_contrast")
    assert _post(f"{url}/v1/reload", b"", "application/json")[0] == 200
    kept = _post(f"{url}/v1/stain?setting=phase_contrast&marker=dapi", _tiff(image))
    assert kept[0] == 200 and kept[1]["x-lmadda-models"] == f"lmadda-dapi/{version.version}"
    assert "failed to load" in kept[1]["x-lmadda-fallback"]
    # ... and /v1/models says so: what is served, what is promoted, and why they differ.
    listed = {(m["marker"], m["setting"]): m for m in json.loads(_get(f"{url}/v1/models")[1])["models"]}
    row = listed[("dapi", "phase_contrast")]
    assert row["served_version"] == str(version.version) and row["promoted_version"] != str(version.version)
    assert "failed to load" in row["status"] and f"serving version {version.version}" in row["status"]


def test_overload_is_refused_by_serve_with_503_json_and_retry_after_and_never_500(endpoint):
    from concurrent.futures import ThreadPoolExecutor

    image = _tiff(np.random.default_rng(2).integers(0, 4000, size=(512, 512)).astype(np.uint16))
    url = f"{endpoint['url']}/v1/stain?setting=bright_field&marker=dapi,cd29"
    with ThreadPoolExecutor(10) as pool:  # 10 at once against 3 ongoing + 2 queued: some must be turned away
        answers = list(pool.map(lambda _: _post(url, image), range(10)))
    statuses = sorted(status for status, _, _ in answers)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 3, statuses
    refused = [(headers, body) for status, headers, body in answers if status == 503]
    assert all(headers.get("retry-after") == "1" and json.loads(body)["error"].startswith("the endpoint is busy") for headers, body in refused)


def _actor_pid(class_name: str) -> int:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=1000)
    return next(a.pid for a in actors if a.class_name == class_name)


def _peak_mib(pid: int, reset: bool = False) -> float:
    from pathlib import Path

    if reset:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM back to the current RSS
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) / 1024


def _read_answer(connection: socket.socket) -> bytes:
    """A JSON answer read off a raw connection: until its body is whole or the server closes."""
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        part = connection.recv(65536)
        if not part:
            break
        answer += part
    return answer


def test_a_chunked_body_past_the_limit_is_cut_off_in_the_proxy_while_the_replica_is_busy(endpoint):
    """Serve's proxy reads a body as fast as the client sends it and queues it for the replica, which
    reads nothing while it computes. The proxy's guard answers 413 at the limit and keeps nothing past it
    (without it, this stream raised the proxy's peak memory by 114 MiB)."""
    import threading
    import time

    proxy = _actor_pid("ProxyActor")
    busy_image = _tiff(np.random.default_rng(5).integers(0, 4000, size=(512, 512)).astype(np.uint16))
    busy = threading.Thread(target=_post, args=(f"{endpoint['url']}/v1/stain?setting=bright_field&marker=dapi,cd29", busy_image))
    baseline = _peak_mib(proxy, reset=True)
    busy.start()
    time.sleep(0.3)  # the replica is in its forward
    port = int(endpoint["url"].rsplit(":", 1)[1])
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall((f"POST /v1/stain?setting=bright_field&marker=dapi HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/tiff\r\n"
                        f"Authorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
    chunk = f"{2**20:x}\r\n".encode() + b"\x00" * 2**20 + b"\r\n"
    sent = 0
    for _ in range(64):  # a client that ignores the answer and sends 64 MiB
        try:
            connection.sendall(chunk)
        except OSError:  # the proxy closed the connection after answering
            break
        sent += 1
    answer = _read_answer(connection)
    connection.close()
    busy.join()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:200]
    assert "limit of 1 MiB while streaming" in json.loads(body)["error"]
    assert _peak_mib(proxy) - baseline < 16, (sent, _peak_mib(proxy) - baseline)


def test_stalled_bodies_are_held_by_the_proxy_and_take_none_of_serves_slots(endpoint):
    """Five clients stall mid-body: more than the replica's 3 ongoing requests and 2 queued. Read in
    the proxy, their bodies never reach Serve, so a normal request is served while they stall."""
    port = int(endpoint["url"].rsplit(":", 1)[1])
    stalled = []
    for _ in range(5):
        connection = socket.create_connection(("127.0.0.1", port), timeout=30)
        connection.sendall((f"POST /v1/stain?setting=bright_field&marker=dapi HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/tiff\r\n"
                            f"Authorization: Bearer {TOKEN}\r\nContent-Length: {2**19}\r\n\r\n").encode() + b"\x00" * 1024)
        stalled.append(connection)
    image = _tiff(np.random.default_rng(6).integers(0, 4000, size=(64, 64)).astype(np.uint16))
    status, _, body = _post(f"{endpoint['url']}/v1/stain?setting=bright_field&marker=dapi", image)
    answers = [_read_answer(connection) for connection in stalled]  # body_timeout_s: 3
    for connection in stalled:
        connection.close()
    assert status == 200, body
    assert all(answer.startswith(b"HTTP/1.1 408") and b"body_timeout_s" in answer for answer in answers), answers[0][:300]


def test_a_token_from_the_launching_shell_and_a_reload_reach_every_replica(endpoint, monkeypatch):
    """Two replicas. The token exists only in this (launching) process, set after Ray started, as on a
    `ray start` cluster; one POST /v1/reload must still reach both replicas."""
    from ray import serve

    from lmadda_serve.app import application
    from lmadda_serve.local import with_launcher_token

    monkeypatch.setenv("LMADDA_TEST_LATE_TOKEN", "late-token-456")  # the raylet, started earlier, never saw it
    client, paths = endpoint["client"], endpoint["paths"]
    first = _register(client, endpoint["tracking_uri"], paths["phase_contrast"], ["lmadda-dapi"], "replica_check")["lmadda-dapi"]
    args = with_launcher_token({"tracking_uri": endpoint["tracking_uri"], "cache_dir": str(endpoint["root"] / "cache2"), "refresh_s": 3600,
                                "tile": 64, "token_env": "LMADDA_TEST_LATE_TOKEN"}, "127.0.0.1", os.environ)
    serve.run(application(args, {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}}), name="lmadda-replicas", route_prefix="/replicas")
    try:
        url = f"{endpoint['url']}/replicas/v1/stain?setting=replica_check&marker=dapi"
        image = _tiff(np.random.default_rng(3).integers(0, 4000, size=(64, 64)).astype(np.uint16))
        assert _post(url, image, token=None)[0] == 401 and _post(url, image, token=TOKEN)[0] == 401
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:  # both replicas serve (and cache) the first version
            warm = list(pool.map(lambda _: _post(url, image, token="late-token-456"), range(12)))
        assert {h["x-lmadda-models"] for _, h, _ in warm} == {f"lmadda-dapi/{first}"}
        second = _register(client, endpoint["tracking_uri"], paths["bright_field"], ["lmadda-dapi"], "replica_check")["lmadda-dapi"]
        assert _post(f"{endpoint['url']}/replicas/v1/reload", b"", "application/json", token="late-token-456")[0] == 200
        import time

        time.sleep(1.5)  # RELOAD_CHECK_S
        with ThreadPoolExecutor(4) as pool:
            after = list(pool.map(lambda _: _post(url, image, token="late-token-456"), range(12)))
        assert {h["x-lmadda-models"] for _, h, _ in after} == {f"lmadda-dapi/{second}"}
    finally:
        serve.delete("lmadda-replicas")


def test_a_huge_header_is_refused_by_the_proxy_before_auth_and_health_stays_fast(endpoint):
    """Serve's proxy parses headers before any ASGI code (and before auth, which the replica checks). With
    uvicorn's default parser a 64 MiB header got 200 after 10 s and stalled /healthz meanwhile; the proxy
    callback's parser answers 431 once 16 KiB are buffered and closes."""
    import threading
    import time

    port = int(endpoint["url"].rsplit(":", 1)[1])
    answers: list[bytes] = []

    def attack() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            connection.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
            try:
                for _ in range(64):  # up to 64 MiB of one header line, unauthenticated
                    connection.sendall(b"a" * 2**20)
            except OSError:  # the proxy answered and closed
                pass
            answers.append(_read_answer(connection))

    thread = threading.Thread(target=attack)
    thread.start()
    started = time.monotonic()
    assert _get(f"{endpoint['url']}/healthz", token=None)[0] == 200
    health_s = time.monotonic() - started
    thread.join(30)
    assert answers and answers[0].startswith(b"HTTP/1.1 431"), answers[:1]
    assert "exceed 16 KiB" in json.loads(answers[0].partition(b"\r\n\r\n")[2])["error"]
    assert health_s < 2
