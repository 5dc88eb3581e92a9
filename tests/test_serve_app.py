"""The endpoint's routes in-process: the real FastAPI app and StainService methods, driven through
ASGI without Ray (Serve's replica context and model multiplexing replaced by plain objects)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch

from lmadda.checkpoint import GeneratorCheckpoint
from lmadda.core.errors import LmaddaError
from lmadda.models import GeneratorConfig, UNetGenerator
from lmadda_serve.registry import ModelRef

TOKEN = "in-process-token-0123456789"


def _tiff(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


IMAGE = _tiff(np.random.default_rng(0).integers(0, 4000, size=(64, 64)).astype(np.uint16))


def _checkpoint(seed: int = 0) -> GeneratorCheckpoint:
    torch.manual_seed(seed)
    generator = UNetGenerator(GeneratorConfig(in_channels=1, out_channels=2, ngf=2, depth=6)).eval()
    return GeneratorCheckpoint(generator=generator, markers=["dapi", "cd29"], setting="bright_field")


class FakeModels:
    """StainModels' interface over a dict: (marker, setting) -> version, and versions that fail to load."""

    def __init__(self, versions: dict[tuple[str, str], str], broken: set[str] = frozenset()):
        self.versions, self.broken, self.refresh_s, self.tracking_uri = dict(versions), set(broken), 3600.0, "fake://registry"
        self.wrong: dict[str, GeneratorCheckpoint] = {}  # model id -> a checkpoint that loads but breaks the contract
        self.refreshes = 0
        self.table = self._table()

    def _table(self):
        return {(m, s): ModelRef(m, s, f"lmadda-{m}", v) for (m, s), v in self.versions.items()}

    def refresh(self, force: bool = False):
        if force:  # what the replica knows changes only when it re-reads the registry
            self.refreshes += 1
            self.table = self._table()
        return self.table

    def resolve(self, marker, setting):
        return self.table[(marker, setting)]


class FakeState:
    """ServiceState's handle interface (`await handle.<method>.remote(...)`) over a real ServiceState object."""

    def __init__(self):
        import lmadda_serve.app as app_module

        state = app_module.ServiceState.func_or_class()
        for name in ("current", "bump", "record_good", "record_failure", "view"):
            async def method(*args, _call=getattr(state, name)):
                return _call(*args)
            setattr(self, name, SimpleNamespace(remote=method))


def patch_app_global(monkeypatch, name, value):
    """Patch a module global of serve/app.py as the service's methods see it (Serve's decorators
    hand the class a copy of the module's globals)."""
    import lmadda_serve.app as app_module

    monkeypatch.setattr(app_module, name, value, raising=False)
    monkeypatch.setitem(app_module.StainService.func_or_class.__mro__[1].__init__.__globals__, name, value)


def make_service(monkeypatch, *, host="127.0.0.1", environ=None, models=None, **kwargs):
    """A StainService instance as a replica would hold it, without Ray."""
    import ray.serve

    import lmadda_serve.app as app_module

    for name in ("LMADDA_SERVE_TOKEN",):
        monkeypatch.delenv(name, raising=False)

    for name, value in (environ or {}).items():
        monkeypatch.setenv(name, value)
    patch_app_global(monkeypatch, "proxy_host", lambda: host)
    user_class = app_module.StainService.func_or_class.__mro__[1]  # the class as written, without Serve's ASGI wrapper
    # Serve keeps one micro-batch queue per decorated method, bound to the event loop of its first call
    # (one replica, one loop); each asyncio.run here is a new loop, so each service gets a new queue.
    monkeypatch.setattr(user_class.forward_tiles.set_max_batch_size.__self__, "_queue", None)
    service = object.__new__(user_class)
    user_class.__init__(service, "sqlite:////nonexistent/mlflow.db", **{"micro_batch": False, "tile": 64, **kwargs})
    if models is not None:
        service.models = models
        checkpoints = {}

        async def get_model(model_id):  # Serve's multiplexed loader, minus Serve
            if model_id in models.broken:
                raise LmaddaError(f"checkpoint of {model_id} is corrupt")
            if model_id in models.wrong:
                return models.wrong[model_id]
            return checkpoints.setdefault(model_id, _checkpoint(int(model_id.rpartition("/")[2])))

        service.get_model = get_model
    context = SimpleNamespace(servable_object=service, _deployment_config=SimpleNamespace(max_ongoing_requests=32))
    monkeypatch.setattr(ray.serve, "get_replica_context", lambda: context)
    return service


async def call(service, method, path, *, query="", headers=(), chunks=(b"",), stall=False, pulled=None):
    """One ASGI request against the real app, bound to `service`; (status, headers, body). The body
    arrives as `chunks`; with `stall`, the client then sends nothing more."""
    from lmadda_serve.app import app

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    queue = list(chunks)
    sent = []

    async def receive():
        if queue:
            chunk = queue.pop(0)
            if pulled is not None:
                pulled.append(len(chunk))
            return {"type": "http.request", "body": chunk, "more_body": bool(queue) or stall}
        if stall:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def stain(service, *, token=TOKEN, setting="bright_field", **kwargs):
    headers = [("content-type", "image/tiff"), *([("authorization", f"Bearer {token}")] if token else []), *kwargs.pop("headers", [])]
    return call(service, "POST", "/v1/stain", query=f"setting={setting}&marker=dapi", headers=headers, **kwargs)


MODELS = {("dapi", "bright_field"): "2"}


# -- 1: stalled bodies -------------------------------------------------------------------------------
def test_clients_that_stall_mid_body_get_408_and_hold_no_compute_slot(monkeypatch):
    service = make_service(monkeypatch, models=FakeModels(MODELS), environ={"LMADDA_SERVE_TOKEN": TOKEN},
                           max_in_flight=1, body_timeout_s=5.0)

    async def scenario():
        stalled = [asyncio.create_task(stain(service, chunks=[b"\x00" * 1024], stall=True)) for _ in range(4)]
        await asyncio.sleep(0.1)  # the stalled ones are in, holding whatever they hold
        normal = await asyncio.wait_for(stain(service, chunks=[IMAGE]), 30)
        still_stalled = sum(not task.done() for task in stalled)
        return normal, still_stalled, await asyncio.wait_for(asyncio.gather(*stalled), 10)

    normal, still_stalled, stalled = asyncio.run(scenario())
    assert normal[0] == 200, normal[2]
    assert still_stalled == 4  # served while they stall, not after they time out
    assert [s for s, _, _ in stalled] == [408] * 4
    assert b"body_timeout_s" in stalled[0][2]


# -- 3: chunked bodies ---------------------------------------------------------------------------------
def test_a_chunked_body_over_the_limit_gets_413_without_being_read_whole(monkeypatch):
    service = make_service(monkeypatch, models=FakeModels(MODELS), environ={"LMADDA_SERVE_TOKEN": TOKEN}, max_body_mb=1)
    pulled: list[int] = []
    chunks = [b"\x00" * 2**16] * 300  # 18.75 MiB, no Content-Length
    status, _, body = asyncio.run(stain(service, chunks=chunks, pulled=pulled))
    assert status == 413 and b"while streaming" in body
    assert sum(pulled) <= 2**20 + 2**16  # stopped at the first chunk past 1 MiB


def test_a_declared_length_over_the_limit_is_refused_before_reading(monkeypatch):
    service = make_service(monkeypatch, models=FakeModels(MODELS), environ={"LMADDA_SERVE_TOKEN": TOKEN}, max_body_mb=1)
    pulled: list[int] = []
    status, _, _ = asyncio.run(stain(service, headers=[("content-length", str(2**30))], chunks=[b"\x00" * 10], pulled=pulled))
    assert status == 413 and pulled == []


# -- 2: decompression bombs, through the route ---------------------------------------------------------
def test_a_decompression_bomb_gets_413_naming_the_limit_before_it_is_decoded(monkeypatch):
    service = make_service(monkeypatch, models=FakeModels(MODELS), environ={"LMADDA_SERVE_TOKEN": TOKEN}, max_megapixels=17)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((8192, 8192), np.uint16), compression="zlib", rowsperstrip=8192)
    assert len(buffer.getvalue()) < 200 * 1024
    started = time.perf_counter()
    status, _, body = asyncio.run(stain(service, chunks=[buffer.getvalue()]))
    assert status == 413 and b"8192x8192 = 67.1 megapixels" in body and b"max_megapixels" in body
    assert time.perf_counter() - started < 2.0  # a header read; decoding alone took seconds


# -- 4 and 5: auth that cannot silently be off ---------------------------------------------------------
def test_a_replica_on_a_non_loopback_address_without_a_token_refuses_to_start(monkeypatch):
    with pytest.raises(LmaddaError, match="refusing to serve on 0.0.0.0 without a token.*allow_unauthenticated: true"):
        make_service(monkeypatch, host="0.0.0.0")
    with pytest.raises(LmaddaError, match="refusing to serve on 127.0.0.1 without a token.*Loopback is no exception"):
        make_service(monkeypatch, host="127.0.0.1")  # auth is on by default, on loopback too
    open_on_purpose = make_service(monkeypatch, host="0.0.0.0", models=FakeModels(MODELS), allow_unauthenticated=True)
    assert asyncio.run(stain(open_on_purpose, token=None, chunks=[IMAGE]))[0] == 200


def test_the_start_up_log_says_whether_auth_is_on_and_where_the_token_came_from_never_the_token(monkeypatch, caplog):
    from lmadda_serve.auth import token_digest

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        make_service(monkeypatch, host="0.0.0.0", token_sha256=token_digest(TOKEN))
        make_service(monkeypatch, host="10.0.0.5", environ={"LMADDA_SERVE_TOKEN": TOKEN})
        make_service(monkeypatch, host="127.0.0.1", allow_unauthenticated=True)
    lines = [r.getMessage() for r in caplog.records if "lmadda endpoint" in r.getMessage()]
    assert "auth ON on 0.0.0.0" in lines[0] and "token_sha256 in the application args" in lines[0]
    assert "auth ON on 10.0.0.5" in lines[1] and "$LMADDA_SERVE_TOKEN in the replica's environment" in lines[1]
    assert "auth OFF on 127.0.0.1" in lines[2] and "allow_unauthenticated: true" in lines[2]
    assert not any(TOKEN in line or token_digest(TOKEN) in line for line in lines)


def test_a_token_given_as_its_digest_guards_every_v1_route(monkeypatch):
    from lmadda_serve.auth import token_digest

    service = make_service(monkeypatch, host="0.0.0.0", models=FakeModels(MODELS), token_sha256=token_digest(TOKEN))
    assert asyncio.run(stain(service, token=None, chunks=[IMAGE]))[0] == 401
    assert asyncio.run(stain(service, token="wrong", chunks=[IMAGE]))[0] == 401
    assert asyncio.run(stain(service, chunks=[IMAGE]))[0] == 200
    assert asyncio.run(call(service, "GET", "/v1/models"))[0] == 401
    assert asyncio.run(call(service, "POST", "/v1/reload"))[0] == 401


def test_openapi_declares_the_bearer_scheme_and_the_open_routes_show_nothing_private(monkeypatch):
    service = make_service(monkeypatch, host="0.0.0.0", models=FakeModels(MODELS), environ={"LMADDA_SERVE_TOKEN": TOKEN})
    status, _, body = asyncio.run(call(service, "GET", "/openapi.json"))
    schema = json.loads(body)
    assert status == 200 and schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert schema["paths"]["/v1/stain"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    assert b"models:/" not in body and b"lmadda-dapi" not in body and b"sqlite" not in body
    assert asyncio.run(call(service, "GET", "/healthz"))[0] == 200

    def unreachable(force=False):
        raise RuntimeError("cannot open sqlite:////srv/secret/mlflow.db as user:password")

    service.models.refresh = unreachable
    status, _, body = asyncio.run(call(service, "GET", "/readyz"))
    assert status == 503 and b"secret" not in body and b"password" not in body


# -- 7: /v1/models says what is served -------------------------------------------------------------------
def test_v1_models_reports_the_served_and_the_promoted_version_and_why_they_differ(monkeypatch):
    models = FakeModels(MODELS)
    service = make_service(monkeypatch, models=models, environ={"LMADDA_SERVE_TOKEN": TOKEN})
    headers = [("authorization", f"Bearer {TOKEN}")]
    listed = json.loads(asyncio.run(call(service, "GET", "/v1/models", headers=headers))[2])["models"][0]
    assert listed["promoted_version"] == "2" and listed["served_version"] is None and "not loaded" in listed["status"]
    assert asyncio.run(stain(service, chunks=[IMAGE]))[0] == 200

    models.versions[("dapi", "bright_field")] = "3"  # a corrupt v3 promoted over v2
    models.broken.add("lmadda-dapi/3")
    asyncio.run(call(service, "POST", "/v1/reload", headers=headers))
    status, answer_headers, _ = asyncio.run(stain(service, chunks=[IMAGE]))
    assert status == 200 and answer_headers["x-lmadda-models"] == "lmadda-dapi/2"
    assert answer_headers["x-lmadda-fallback"] == "lmadda-dapi/3 failed to load, served lmadda-dapi/2"
    listed = json.loads(asyncio.run(call(service, "GET", "/v1/models", headers=headers))[2])["models"][0]
    assert listed["promoted_version"] == "3" and listed["served_version"] == "2"
    assert "promoted version failed to load (LmaddaError" in listed["status"] and "serving version 2" in listed["status"]
    # both stains were tallied for the domain check (these test models carry no reference: verdict unknown)
    assert listed["domain"]["images"] == 2 and listed["domain"]["unknown"] == 2 and listed["domain"]["mean_score"] is None


def test_a_failed_version_is_retried_after_a_reload_not_on_every_request(monkeypatch):
    models = FakeModels({("dapi", "bright_field"): "3"}, broken={"lmadda-dapi/3"})
    service = make_service(monkeypatch, models=models, environ={"LMADDA_SERVE_TOKEN": TOKEN})
    attempts = []
    load = service.get_model

    async def counting(model_id):
        attempts.append(model_id)
        return await load(model_id)

    service.get_model = counting
    assert [asyncio.run(stain(service, chunks=[IMAGE]))[0] for _ in range(3)] == [503] * 3
    assert attempts == ["lmadda-dapi/3"]
    models.broken.clear()  # the operator fixed the file in the registry
    asyncio.run(call(service, "POST", "/v1/reload", headers=[("authorization", f"Bearer {TOKEN}")]))
    assert asyncio.run(stain(service, chunks=[IMAGE]))[0] == 200


# -- 8: a reload reaches every replica --------------------------------------------------------------------
def test_a_reload_on_one_replica_reaches_the_others_through_the_shared_stamp(monkeypatch):
    patch_app_global(monkeypatch, "RELOAD_CHECK_S", 0.0)
    state = FakeState()
    models_a, models_b = FakeModels(MODELS), FakeModels(MODELS)
    replica_a = make_service(monkeypatch, models=models_a, environ={"LMADDA_SERVE_TOKEN": TOKEN}, state=state)
    replica_b = make_service(monkeypatch, models=models_b, environ={"LMADDA_SERVE_TOKEN": TOKEN}, state=state)
    assert asyncio.run(stain(replica_b, chunks=[IMAGE]))[2][:2] in (b"II", b"MM")  # B serves v2 and has read the stamp
    for models in (models_a, models_b):
        models.versions[("dapi", "bright_field")] = "5"  # promoted in the registry both replicas read
    monkeypatch.setattr(ray_serve(), "get_replica_context", lambda: SimpleNamespace(servable_object=replica_a))
    asyncio.run(call(replica_a, "POST", "/v1/reload", headers=[("authorization", f"Bearer {TOKEN}")]))
    monkeypatch.setattr(ray_serve(), "get_replica_context", lambda: SimpleNamespace(servable_object=replica_b))
    status, headers, _ = asyncio.run(stain(replica_b, chunks=[IMAGE]))
    assert status == 200 and headers["x-lmadda-models"] == "lmadda-dapi/5"


def ray_serve():
    import ray.serve

    return ray.serve


# -- 9: routing errors in the documented shape -------------------------------------------------------------
def test_unknown_routes_and_wrong_methods_answer_with_the_error_shape(monkeypatch):
    service = make_service(monkeypatch, models=FakeModels(MODELS), environ={"LMADDA_SERVE_TOKEN": TOKEN})
    status, _, body = asyncio.run(call(service, "GET", "/v1/nothing"))
    assert status == 404 and "POST /v1/stain" in json.loads(body)["error"]
    status, _, body = asyncio.run(call(service, "GET", "/v1/stain"))
    assert status == 405 and "GET is not allowed on /v1/stain" in json.loads(body)["error"]


def test_a_micro_batched_forward_never_exceeds_the_tile_cap(monkeypatch):
    import lmadda_serve.app as app_module

    service = make_service(monkeypatch, models=FakeModels(MODELS), environ={"LMADDA_SERVE_TOKEN": TOKEN}, micro_batch=True, tile_batch=4)
    sizes = []
    forward = service.forward

    def counting(generator, tiles):
        sizes.append(len(tiles))
        return forward(generator, tiles)

    service.forward = counting
    image = _tiff(np.random.default_rng(1).integers(0, 4000, size=(256, 256)).astype(np.uint16))  # 25 tiles of 64

    async def concurrent():
        return await asyncio.gather(*[stain(service, chunks=[image]) for _ in range(8)])

    assert [status for status, _, _ in asyncio.run(concurrent())] == [200] * 8
    assert max(sizes) <= app_module.TILES_PER_FORWARD and sum(sizes) == 8 * 25


def test_a_request_alone_on_the_replica_skips_the_micro_batcher_and_concurrent_ones_share_it(monkeypatch):
    """Alone, a request has nobody to share a forward with: waiting batch_wait_timeout_s per tile batch is pure latency."""
    import sys

    service = make_service(monkeypatch, models=FakeModels(MODELS), environ={"LMADDA_SERVE_TOKEN": TOKEN}, micro_batch=True, tile_batch=4)
    forwards = []  # (tiles, whether the micro-batcher ran the forward)
    forward = service.forward

    def recording(checkpoint, tiles):
        forwards.append((len(tiles), sys._getframe(1).f_code.co_name == "forward_tiles"))
        return forward(checkpoint, tiles)

    service.forward = recording
    image = _tiff(np.random.default_rng(2).integers(0, 4000, size=(256, 256)).astype(np.uint16))  # 25 tiles of 64
    assert asyncio.run(stain(service, chunks=[image]))[0] == 200
    assert forwards == [(4, False)] * 6 + [(1, False)]
    forwards.clear()

    async def concurrent():
        return await asyncio.gather(*[stain(service, chunks=[image]) for _ in range(4)])

    assert [status for status, _, _ in asyncio.run(concurrent())] == [200] * 4
    assert sum(n for n, _ in forwards) == 4 * 25 and any(batched and n > 4 for n, batched in forwards)  # shared forwards


# -- compute slots: beyond max_in_flight a request waits (Serve counts it and routes others elsewhere) ------
def test_a_request_beyond_max_in_flight_waits_for_a_compute_slot_instead_of_being_refused(monkeypatch):
    service = make_service(monkeypatch, models=FakeModels(MODELS), environ={"LMADDA_SERVE_TOKEN": TOKEN}, max_in_flight=1)
    computing = []  # requests computing at each forward
    forward = service.forward

    def recording(checkpoint, tiles):
        computing.append(service.in_flight)
        return forward(checkpoint, tiles)

    service.forward = recording
    image = _tiff(np.random.default_rng(3).integers(0, 4000, size=(128, 128)).astype(np.uint16))

    async def concurrent():
        return await asyncio.gather(*[stain(service, chunks=[image]) for _ in range(3)])

    assert [status for status, _, _ in asyncio.run(concurrent())] == [200] * 3
    assert computing and max(computing) == 1


# -- pixel size: carried through, reported, and checked as lmadda predict checks it -----------------------------
def _calibrated_tiff(um: float | None) -> bytes:
    from lmadda.data.calibration import PixelSize, tiff_resolution

    buffer = io.BytesIO()
    pixels = np.random.default_rng(4).integers(0, 4000, size=(64, 64)).astype(np.uint16)
    tifffile.imwrite(buffer, pixels, **(tiff_resolution(PixelSize.square(um)) if um else {}))
    return buffer.getvalue()


def _service_with_model_pixel_size(monkeypatch, model_um: float):
    service = make_service(monkeypatch, models=FakeModels(MODELS), environ={"LMADDA_SERVE_TOKEN": TOKEN})
    asyncio.run(service.get_model("lmadda-dapi/2")).metadata["pixel_size_um"] = model_um
    return service


def test_the_stain_carries_the_input_pixel_size_in_its_tiff_and_a_header(monkeypatch):
    from lmadda.data.io import decode_image

    service = _service_with_model_pixel_size(monkeypatch, 0.65)
    status, headers, body = asyncio.run(stain(service, chunks=[_calibrated_tiff(0.65)]))
    assert status == 200 and headers["x-lmadda-pixel-size-um"] == "0.65" and "x-lmadda-warning" not in headers
    assert decode_image(body, "tiff", "response").pixel_size.x_um == pytest.approx(0.65, rel=1e-4)


def test_a_pixel_size_beyond_predicts_tolerance_gets_predicts_warning_in_a_header(monkeypatch):
    from lmadda.data.calibration import PixelSize, check_pixel_size

    service = _service_with_model_pixel_size(monkeypatch, 0.65)
    status, headers, _ = asyncio.run(stain(service, chunks=[_calibrated_tiff(1.3)]))
    expected = check_pixel_size(PixelSize.square(1.3), 0.65, image_name="the image", model_name="models:/lmadda-dapi/2")
    assert status == 200 and headers["x-lmadda-pixel-size-um"] == "1.3"
    assert headers["x-lmadda-warning"] == expected.message.replace("µ", "u")
    assert "Resample the image by" in headers["x-lmadda-warning"] and "scale:0.5" in headers["x-lmadda-warning"]
    # within the tolerance (10 %): no warning; an image that records no pixel size: no header
    assert "x-lmadda-warning" not in asyncio.run(stain(service, chunks=[_calibrated_tiff(0.7)]))[1]
    status, headers, _ = asyncio.run(stain(service, chunks=[_calibrated_tiff(None)]))
    assert status == 200 and "x-lmadda-pixel-size-um" not in headers and "x-lmadda-warning" not in headers


# -- one staining routine: the endpoint drives lmadda.inference.StainPlan, as lmadda predict does ------------
def test_the_endpoint_stains_an_image_exactly_as_the_library_and_lmadda_predict_do(monkeypatch, tmp_path):
    from lmadda.checkpoint import save_checkpoint
    from lmadda.data.io import decode_image
    from lmadda.domain import build_reference
    from lmadda.inference import predict_file
    from lmadda.inference import stain as library_stain

    service = make_service(monkeypatch, models=FakeModels(MODELS), environ={"LMADDA_SERVE_TOKEN": TOKEN})
    checkpoint = asyncio.run(service.get_model("lmadda-dapi/2"))
    rng = np.random.default_rng(5)
    references = [rng.normal(size=(1, 64, 64)).astype(np.float32) for _ in range(3)]
    checkpoint.domain_reference = build_reference(checkpoint.generator, references, domain="bright_field", crop_size=64, crops=4)
    pixels = rng.integers(0, 4000, size=(1, 100, 72)).astype(np.uint16)  # 6 tiles of 64: two batches of tile_batch 4

    served = asyncio.run(service.stain_image(checkpoint, pixels))
    library = library_stain(checkpoint, pixels, tile=64, batch_size=service.tile_batch, device="cpu")
    np.testing.assert_array_equal(served.camera, library.camera)
    assert served.domain is not None and served.domain == library.domain

    status, headers, body = asyncio.run(stain(service, chunks=[_tiff(pixels[0])]))
    tifffile.imwrite(tmp_path / "in.tif", pixels[0])
    predict_file(save_checkpoint(tmp_path / "model.pt", checkpoint), tmp_path / "in.tif", tmp_path / "out.tif", tile=64,
                 batch_size=service.tile_batch, device="cpu")
    assert status == 200 and headers["x-lmadda-domain-score"] == f"{library.domain.score:.3f}"
    np.testing.assert_array_equal(decode_image(body, "tiff", "response").pixels[0], tifffile.imread(tmp_path / "out.tif")[0])


def test_a_rebinding_host_and_a_cross_origin_post_are_refused_whatever_the_auth(monkeypatch):
    """With auth off on loopback, `Host: evil.example` on /v1/models and a cross-origin form POST to /v1/reload
    both got 200 (issue 26, hole 7): DNS rebinding from any page the operator opens."""
    service = make_service(monkeypatch, models=FakeModels(MODELS), allow_unauthenticated=True)
    status, headers, body = asyncio.run(call(service, "GET", "/v1/models", headers=[("host", "evil.example:8000")]))
    assert status == 403 and headers["content-type"] == "application/json" and "not a loopback name" in json.loads(body)["error"]
    status, _, body = asyncio.run(call(service, "POST", "/v1/reload", headers=[("host", "127.0.0.1:8000"), ("origin", "http://evil.example")]))
    assert status == 403 and "cross-origin request from http://evil.example refused" in json.loads(body)["error"]
    same_origin = [("host", "127.0.0.1:8000"), ("origin", "http://127.0.0.1:8000")]  # the endpoint's own /docs page
    assert asyncio.run(call(service, "GET", "/v1/models", headers=same_origin))[0] == 200
    assert asyncio.run(call(service, "GET", "/v1/models", headers=[("host", "localhost:8000")]))[0] == 200
    named = make_service(monkeypatch, host="0.0.0.0", models=FakeModels(MODELS), environ={"LMADDA_SERVE_TOKEN": TOKEN},
                         allowed_hosts=["stain.lab.example"])
    authorised = [("authorization", f"Bearer {TOKEN}")]
    assert asyncio.run(call(named, "GET", "/v1/models", headers=[*authorised, ("host", "stain.lab.example")]))[0] == 200
    assert asyncio.run(call(named, "GET", "/v1/models", headers=[*authorised, ("host", "evil.example")]))[0] == 403


# -- the last good version is the service's, and a version must pass its contract (issue 26, holes 2 and 3) --
def _two_replicas(monkeypatch, versions):
    state = FakeState()
    models = FakeModels(versions)
    replicas = [make_service(monkeypatch, models=models, environ={"LMADDA_SERVE_TOKEN": TOKEN}, state=state) for _ in range(2)]
    return models, replicas


def _listed(service) -> dict:
    return json.loads(asyncio.run(call(service, "GET", "/v1/models", headers=[("authorization", f"Bearer {TOKEN}")]))[2])["models"][0]


def test_a_replica_that_never_served_the_good_version_falls_back_to_the_services(monkeypatch):
    """Before: 5 of 20 requests got 503 from a replica that had not served the good version since it started, and
    /v1/models answered differently per replica."""
    models, (warm, fresh) = _two_replicas(monkeypatch, MODELS)
    assert asyncio.run(stain(warm, chunks=[IMAGE]))[0] == 200  # v2 served on one replica only
    models.versions[("dapi", "bright_field")] = "3"
    models.broken.add("lmadda-dapi/3")  # a text file registered as v3 and promoted
    models.refresh(force=True)
    status, headers, _ = asyncio.run(stain(fresh, chunks=[IMAGE]))
    assert status == 200 and headers["x-lmadda-models"] == "lmadda-dapi/2" and "lmadda-dapi/3" in headers["x-lmadda-fallback"]
    assert _listed(warm)["status"] == _listed(fresh)["status"] and _listed(warm)["served_version"] == _listed(fresh)["served_version"] == "2"


@pytest.mark.parametrize("wrong, words", [
    (GeneratorCheckpoint(generator=UNetGenerator(GeneratorConfig(in_channels=1, out_channels=1, ngf=2, depth=6)).eval(), markers=["cd29"],
                         setting="bright_field"), "it predicts ['cd29'], not dapi"),
    (GeneratorCheckpoint(generator=UNetGenerator(GeneratorConfig(in_channels=3, out_channels=2, ngf=2, depth=6)).eval(),
                         markers=["dapi", "cd29"], setting="bright_field"), "expects 3 input channels; this setting's images have 1"),
    (GeneratorCheckpoint(generator=UNetGenerator(GeneratorConfig(in_channels=1, out_channels=2, ngf=2, depth=7)).eval(),
                         markers=["dapi", "cd29"], setting="bright_field"), "multiple of 128; the endpoint's tile is 64"),
])
def test_a_version_that_loads_but_breaks_the_settings_contract_never_replaces_the_served_one(monkeypatch, wrong, words):
    """Before: a checkpoint predicting only cd29 registered as lmadda-dapi got 500 on every request and became the
    replica's fallback; one expecting 3 channels made the endpoint blame the client's image (400)."""
    models, (first, second) = _two_replicas(monkeypatch, MODELS)
    assert asyncio.run(stain(first, chunks=[IMAGE]))[0] == 200
    models.versions[("dapi", "bright_field")] = "4"
    models.wrong["lmadda-dapi/4"] = wrong
    models.refresh(force=True)
    for replica in (first, second):
        status, headers, _ = asyncio.run(stain(replica, chunks=[IMAGE]))
        assert status == 200 and headers["x-lmadda-models"] == "lmadda-dapi/2"
    listed = _listed(second)
    assert listed["served_version"] == "2" and "failed its contract check" in listed["status"] and words in listed["status"]


# -- capacity checked against memory, not only counted (issue 26) ----------------------------------------
def test_the_replica_admits_by_pixel_budget_and_says_how_many_megapixels_it_holds(monkeypatch):
    from lmadda_serve.app import BYTES_PER_PIXEL

    # a budget of 1.5 images of 64 x 64: the second request waits until the first is stained
    memory_mb = 1.5 * 64 * 64 * BYTES_PER_PIXEL / 2**20
    service = make_service(monkeypatch, models=FakeModels(MODELS), environ={"LMADDA_SERVE_TOKEN": TOKEN}, replica_memory_mb=memory_mb,
                           max_megapixels=0.005, max_in_flight=4)
    listed = json.loads(asyncio.run(call(service, "GET", "/v1/models", headers=[("authorization", f"Bearer {TOKEN}")]))[2])
    assert listed["replica"] == {"megapixel_budget": 0.01, "megapixels_in_use": 0.0, "bytes_per_pixel": BYTES_PER_PIXEL}
    peak, stain_image = [], service.stain_image

    async def watched(checkpoint, pixels):
        peak.append(service.budget.in_use)
        await asyncio.sleep(0.05)
        return await stain_image(checkpoint, pixels)

    service.stain_image = watched

    async def both():
        return await asyncio.gather(stain(service, chunks=[IMAGE]), stain(service, chunks=[IMAGE]))

    assert [answer[0] for answer in asyncio.run(both())] == [200, 200]
    assert max(peak) == pytest.approx(64 * 64 / 1e6) and service.budget.in_use == 0  # one at a time, all released


def test_a_per_image_limit_the_replica_budget_cannot_hold_is_refused_at_start(monkeypatch):
    with pytest.raises(LmaddaError, match="max_megapixels 17 exceeds what replica_memory_mb 512 holds"):
        make_service(monkeypatch, environ={"LMADDA_SERVE_TOKEN": TOKEN}, replica_memory_mb=512)
