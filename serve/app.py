"""The Ray Serve application: `POST /v1/stain` turns a label-free image into predicted stains.

    serve run serve/config.yaml                       # Serve's config format (also the RayService's)
    lmadda serve --tracking-uri sqlite:///$PWD/demo-out/sweeps/mlflow.db   # or $MLFLOW_TRACKING_URI; one is needed

One deployment, `StainService`, behind a FastAPI ingress:
- models come from the MLflow registry by alias (`models:/lmadda-<marker>@<setting>`) through Serve
  model multiplexing (an LRU of `MODELS_PER_REPLICA` generators per replica), keyed by registry
  name and version, so promoting a new champion yields a new key and is served after the next alias
  refresh (`refresh_s`, or `POST /v1/reload`), and a version that fails to load leaves the previous
  one serving;
- the image is stained by `lmadda predict`'s own routine (`lmadda.inference.StainPlan`: normalisation,
  input correction, tiles, blend, camera units, domain score), driven here with an awaited forward in
  which tiles of concurrent requests for the same model are micro-batched (`@serve.batch`);
- admission is Serve's: `max_ongoing_requests` per replica (Serve routes each request to a replica
  with room and scales on the count) and `max_queued_requests` beyond them, past which Serve answers
  503 with Retry-After (`backpressure_config`); `serve/proxy.py` reads each body whole in the proxy,
  under the limits below, before Serve routes the request, and gives Serve's own errors the
  `{"error": ...}` shape;
- the replica reads the body first too (the proxy's guard is installed only when Serve starts with
  it), under a byte limit kept while streaming and a time limit
  (`body_timeout_s`), and only then does a request take one of the replica's `max_in_flight`
  compute slots (or wait for one, still counted by Serve as ongoing here), so clients that stall
  or stream without end hold no compute slot; the image's declared pixel count is checked
  (`max_megapixels`) before it is decoded;
- the answer carries the input's pixel size (TIFF resolution tags, `X-Lmadda-Pixel-Size-Um`) and,
  when it differs from the model's training pixel size beyond `lmadda predict`'s tolerance, the
  same warning (`X-Lmadda-Warning`);
- a bearer token guards every /v1 route (`serve/auth.py`): a replica without one refuses to start
  unless the config says `allow_unauthenticated: true` (loopback included), and the Host and Origin
  headers of every /v1 request are checked (DNS rebinding, cross-origin forms), auth or not;
- `POST /v1/reload` bumps a stamp held by a tiny `ServiceState` deployment, which every replica reads
  at most once a second, so all replicas re-read the registry, not only the one that got the POST;
- a new version replaces the served one only once it loads and passes its contract (`check_contract`:
  marker, input channels, tile multiple, a smoke forward); otherwise every replica keeps serving the
  service's last good version, which `ServiceState` holds, and /v1/models says why from every replica.
"""


import asyncio
import contextlib
import inspect
import logging
import os
import time
import typing

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from lmadda.checkpoint import GeneratorCheckpoint
from lmadda.core.device import resolve_device
from lmadda.core.errors import LmaddaError
from lmadda.data.calibration import PixelSize, check_pixel_size
from lmadda.domain import forward_scored
from lmadda.inference import Stain, StainPlan
from lmadda_serve.auth import origin_problem, resolve_auth
from lmadda_serve.codec import (RequestError, check_channels, check_name, declared_request, decode_request_image, encode_tiff,
                                parse_markers, read_body)
from lmadda_serve.domain_report import DomainTally, domain_headers
from lmadda_serve.registry import StainModels

logger = logging.getLogger("ray.serve")
MODELS_PER_REPLICA = 8  # generators kept per replica (LRU); a 16-layer ngf=64 generator is ~200 MB
MAX_BODY_MB, BODY_TIMEOUT_S = 80.0, 20.0  # default body limits; serve/proxy.py keeps the same ones in the proxies
TILES_PER_FORWARD = 16  # most tiles in one micro-batched forward (or tile_batch, if larger): bounds its memory
# Replica memory per image pixel while it is decoded and stained (tile 256, tile_batch 4, float32): measured 743 MiB
# for one 4096 x 4096 image (46 bytes), rounded up for the TIFF encode and the allocator.
BYTES_PER_PIXEL = 60
app = FastAPI(title="lmadda virtual staining", version="1",
              description="Post a label-free microscopy image (TIFF or PNG body); get the predicted fluorescence stains as a TIFF.")


def pixel_size_headers(pixel_size: PixelSize | None, warnings: list[str]) -> dict:
    """`X-Lmadda-Pixel-Size-Um` (µm; `x,y` when the pixels are not square; absent when the image records
    none) and `X-Lmadda-Warning` (lmadda predict's pixel-size warnings, one per model that gave one).
    Header values are ASCII, so µm is written um there."""
    headers = {}
    if pixel_size is not None:
        square = pixel_size.x_um == pixel_size.y_um
        headers["X-Lmadda-Pixel-Size-Um"] = f"{pixel_size.x_um:.6g}" if square else f"{pixel_size.x_um:.6g},{pixel_size.y_um:.6g}"
    if warnings:
        text = " | ".join(dict.fromkeys(warnings)).replace("µ", "u")
        headers["X-Lmadda-Warning"] = text.encode("ascii", "replace").decode()
    return headers


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI: the registry when the args name none. Without either there is nothing to serve from, and
    guessing a local file would serve whatever sits there: LmaddaError, naming the three ways to give one."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        raise LmaddaError("no model registry: set tracking_uri in the serve config's args, or $MLFLOW_TRACKING_URI, or run "
                          "`lmadda serve --tracking-uri URI` (the demo's: sqlite:///$PWD/demo-out/sweeps/mlflow.db)")
    return uri


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers or None)


# Every error body is {"error": ...}, the routing ones too (FastAPI's own are {"detail": ...}).
@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    routes = "POST /v1/stain, GET /v1/models, POST /v1/reload, GET /healthz, GET /readyz, GET /docs"
    message = {404: f"no route {request.url.path}; routes: {routes}",
               405: f"{request.method} is not allowed on {request.url.path}; routes: {routes}"}.get(error.status_code, str(error.detail))
    return JSONResponse({"error": message}, status_code=error.status_code, headers=getattr(error, "headers", None))


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return JSONResponse({"error": f"invalid request ({problems})"}, status_code=400)


def openapi_with_bearer() -> dict:
    """The OpenAPI document with the bearer scheme declared on the /v1 routes. Deliberately open,
    like /docs: it describes the public API only (routes and parameters), never models, versions
    or the registry, so clients can discover how to call before they hold a token."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, operations in schema["paths"].items():
            if path.startswith("/v1/"):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = openapi_with_bearer
RELOAD_CHECK_S = 1.0  # how often a replica reads the shared reload stamp: one cheap call a second at most


def proxy_host() -> str:
    """The address Serve's proxies listen on (http_options.host), asked of the controller once at start-up."""
    from ray.serve.context import _get_global_client

    return _get_global_client().http_config.host


@serve.deployment(name="ServiceState", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class ServiceState:
    """What every StainService replica must agree on, in one place (a handle call reaches only one replica):
    - the reload stamp that `POST /v1/reload` bumps and every replica polls;
    - per (marker, setting), the last version that loaded and passed its contract on any replica, so that a
      replica that never served it still falls back to it, and /v1/models says the same from every replica;
    - per version, why it failed (load or contract)."""

    def __init__(self):
        self.stamp = 0
        self.good: dict[tuple[str, str], tuple[str, int]] = {}  # (marker, setting) -> (model id, input channels)
        self.failed: dict[str, str] = {}  # model id -> why

    def bump(self) -> int:
        self.stamp += 1
        return self.stamp

    def current(self) -> int:
        return self.stamp

    def record_good(self, marker: str, setting: str, model_id: str, in_channels: int) -> None:
        self.good[(marker, setting)] = (model_id, in_channels)
        self.failed.pop(model_id, None)

    def record_failure(self, model_id: str, reason: str) -> None:
        self.failed[model_id] = reason

    def view(self) -> tuple[dict, dict]:
        return dict(self.good), dict(self.failed)


class PixelBudget:
    """The megapixels one replica decodes and stains at once. Counting requests (max_in_flight) does not bound
    memory: one 4096 x 4096 image took +743 MiB on a replica and four at once 2.2 GB. A request takes the
    megapixels its image declares, from the header, before it is decoded, and waits while they are not free."""

    def __init__(self, megapixels: float):
        self.megapixels, self.in_use = megapixels, 0.0
        self.freed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, megapixels: float):
        async with self.freed:
            await self.freed.wait_for(lambda: self.in_use + megapixels <= self.megapixels or self.in_use == 0)
            self.in_use += megapixels
        try:
            yield
        finally:
            async with self.freed:
                self.in_use -= megapixels
                self.freed.notify_all()

    def as_dict(self) -> dict:
        return {"megapixel_budget": round(self.megapixels, 2), "megapixels_in_use": round(self.in_use, 2),
                "bytes_per_pixel": BYTES_PER_PIXEL}


class ContractError(LmaddaError):
    """A checkpoint that loads but cannot serve its (marker, setting)."""


def check_contract(checkpoint: GeneratorCheckpoint, marker: str, *, tile: int, in_channels: int | None, device) -> None:
    """Before a version replaces the served one: it predicts `marker`, takes the setting's input channels (those of
    the last good version, when there is one), tiles at `tile` (a multiple of 2**depth), and a smoke forward on a
    fixed tile gives finite stains of the right shape. ContractError says which failed."""
    if marker not in checkpoint.markers:
        raise ContractError(f"it predicts {checkpoint.markers}, not {marker}")
    config = checkpoint.config
    if in_channels is not None and config.in_channels != in_channels:
        raise ContractError(f"it expects {config.in_channels} input channels; this setting's images have {in_channels}")
    multiple = 2 ** config.depth
    if tile % multiple:
        raise ContractError(f"its depth {config.depth} needs tiles that are a multiple of {multiple}; the endpoint's tile is {tile}")
    side = max(multiple, 32)
    probe = np.random.default_rng(0).normal(size=(1, config.in_channels, side, side)).astype(np.float32)
    predictions, _ = forward_scored(checkpoint, torch.from_numpy(probe).to(device))
    if predictions.shape != (1, len(checkpoint.markers), side, side) or not np.isfinite(predictions).all():
        raise ContractError(f"its smoke forward gave {predictions.shape} with non-finite values or the wrong shape")


# Serve's own admission limits (serve/config.yaml sets them too). A request counts from the moment Serve hands
# it to a replica: with the proxies' guard (serve/proxy.py) once its body is whole, without it while the body
# is still arriving, so max_ongoing_requests is set well above max_in_flight.
@serve.deployment(name="StainService", max_ongoing_requests=32, max_queued_requests=64, backpressure_config={"retry_after_s": 1})
@serve.ingress(app)
class StainService:
    def __init__(self, tracking_uri: str | None = None, *, cache_dir: str | None = None, refresh_s: float = 30.0,
                 max_body_mb: float = MAX_BODY_MB, max_in_flight: int = 8, tile: int = 256, overlap: float = 0.25,
                 tile_batch: int = 4, micro_batch: bool = True, token_env: str = "LMADDA_SERVE_TOKEN",
                 token_sha256: str | None = None, allow_unauthenticated: bool = False, body_timeout_s: float = BODY_TIMEOUT_S,
                 max_megapixels: float = 17.0, min_side: int = 32, allowed_hosts: list[str] | None = None,
                 replica_memory_mb: float = 2048.0, state=None):
        host = proxy_host()
        self.bind_host, self.allowed_hosts = host, allowed_hosts
        # Before anything else: a replica that would be open to the network without saying so must not start.
        self.auth = resolve_auth(host=host, token_env=token_env, environ=os.environ, token_sha256=token_sha256,
                                 allow_unauthenticated=allow_unauthenticated)
        logger.info("lmadda endpoint: %s", self.auth.describe(host))
        self.models = StainModels(tracking_uri or default_tracking_uri(), cache_dir, refresh_s)  # None: the per-user cache
        self.max_bytes = int(max_body_mb * 2**20)
        self.body_timeout_s, self.max_megapixels, self.min_side = body_timeout_s, max_megapixels, min_side
        # The one limit kept by hand. Serve counts a request from the moment it reaches the replica, which
        # without the proxies' guard is before its body is in, and has no limit of its own for "computing
        # now": so a request takes a compute slot once its body is read, or waits here for one (Serve still
        # counts it as ongoing on this replica and routes new requests to replicas with room).
        self.max_in_flight, self.compute_slots = max_in_flight, asyncio.Semaphore(max_in_flight)
        # And a memory budget, which counting requests is not: the megapixels this replica holds at once.
        self.budget = PixelBudget(replica_memory_mb * 2**20 / BYTES_PER_PIXEL / 1e6)
        if max_megapixels > self.budget.megapixels:
            raise LmaddaError(f"max_megapixels {max_megapixels:g} exceeds what replica_memory_mb {replica_memory_mb:g} holds "
                              f"({self.budget.megapixels:.1f} megapixels at {BYTES_PER_PIXEL} bytes each): lower max_megapixels "
                              "or raise replica_memory_mb (and the replica's memory)")
        self.tile, self.overlap, self.tile_batch, self.micro_batch = tile, overlap, tile_batch, micro_batch
        if tile_batch > TILES_PER_FORWARD:  # one call must fit in a batch, or Serve refuses it
            self.forward_tiles.set_max_batch_size(tile_batch)
        self.device = resolve_device()
        self.in_flight = 0
        self.serving: dict[tuple[str, str], str] = {}  # (marker, setting) -> model id of the last good load here
        self.channels: dict[tuple[str, str], int] = {}  # (marker, setting) -> input channels of that version
        self.verified: set[str] = set()  # model ids that passed their contract check on this replica
        # model id -> (when, why) of its last failed load: retried after refresh_s or a reload, not per request
        self.failed: dict[str, tuple[float, str]] = {}
        self.domain_tallies: dict[tuple[str, str], DomainTally] = {}  # (marker, setting) -> how its images scored here
        self.state, self.seen_stamp, self.next_stamp_check = state, None, 0.0
        self.stamp_lock = asyncio.Lock()  # requests that arrive during a stamp check wait for its reload
        self.contract_lock = asyncio.Lock()

    # -- models ---------------------------------------------------------------------------------
    # Serve multiplexing here is the per-replica LRU only, not its routing: Serve routes by a
    # serve_multiplexed_model_id header naming one of the ids a replica loaded, and these are registry
    # versions (lmadda-dapi/3), which a client does not know (it names an alias) and one request may need
    # several of (marker=dapi,cd29).
    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def get_model(self, model_id: str) -> GeneratorCheckpoint:
        checkpoint = await asyncio.to_thread(self.models.load, model_id)
        checkpoint.generator.eval().to(self.device)
        return checkpoint

    async def model_for(self, marker: str, setting: str) -> tuple[str, GeneratorCheckpoint, str]:
        """(served model id, its checkpoint, promoted model id) for (marker, setting): the current champion once it
        loads and passes its contract, else the last good version of the service (any replica's)."""
        ref = self.models.resolve(marker, setting)
        failed = self.failed.get(ref.model_id)
        if failed is None or time.monotonic() - failed[0] >= self.models.refresh_s:
            try:
                checkpoint = await self.get_model(ref.model_id)
                async with self.contract_lock:  # concurrent first requests for a new version check it once
                    if ref.model_id not in self.verified:
                        known = self.channels.get((marker, setting)) or (await self.shared_good()).get((marker, setting), (None, None))[1]
                        await asyncio.to_thread(check_contract, checkpoint, marker, tile=self.tile, in_channels=known, device=self.device)
                        self.verified.add(ref.model_id)
                self.serving[(marker, setting)] = ref.model_id
                self.channels[(marker, setting)] = checkpoint.config.in_channels
                self.failed.pop(ref.model_id, None)
                await self.share("record_good", marker, setting, ref.model_id, checkpoint.config.in_channels)
                return ref.model_id, checkpoint, ref.model_id
            except Exception as error:  # a broken or wrong new version must not take the service down
                reason = f"failed its contract check: {error}" if isinstance(error, ContractError) else f"failed to load ({type(error).__name__}; see the replica log)"
                self.failed[ref.model_id] = (time.monotonic(), reason)
                await self.share("record_failure", ref.model_id, reason)
                logger.error("%s %s: %s", ref.model_id, reason, error)
        previous = self.serving.get((marker, setting)) or (await self.shared_good()).get((marker, setting), (None, None))[0]
        if previous is None or previous == ref.model_id:
            raise RequestError(503, f"model {ref.model_id} for {marker}@{setting} cannot be served ({self.failed[ref.model_id][1]}), "
                                    "and no earlier version of it served; the operator has been logged the cause", {"Retry-After": "30"})
        self.serving[(marker, setting)] = previous  # good on another replica (or here): it passed its contract there
        return previous, await self.get_model(previous), ref.model_id

    async def share(self, method: str, *args) -> None:
        """Tell the service state (no-op without one); its being briefly away must not fail a request."""
        if self.state is None:
            return
        try:
            await getattr(self.state, method).remote(*args)
        except Exception as error:
            logger.warning("the service state did not take %s (%s)", method, error)

    async def shared_good(self) -> dict:
        return (await self.shared_view())[0]

    async def shared_view(self) -> tuple[dict, dict]:
        if self.state is None:
            return {}, {}
        try:
            return await self.state.view.remote()
        except Exception as error:
            logger.warning("reading the service state failed (%s); answering from this replica alone", error)
            return {}, {}

    def served_state(self, marker: str, setting: str, promoted: str, shared: tuple[dict, dict]) -> tuple[str | None, str]:
        """(served version, why it is or is not the promoted one) for the service, for /v1/models: from the shared
        state, so every replica gives the same answer (this replica's own view where there is no shared state)."""
        good, failures = shared
        served = good.get((marker, setting), (None, None))[0] or self.serving.get((marker, setting))
        why = failures.get(promoted) or (self.failed[promoted][1] if promoted in self.failed else None)
        version = served.partition("/")[2] if served else None
        if why is not None:
            fallback = f"serving version {version}" if served and served != promoted else "nothing to fall back to: requests get 503"
            return (version if served != promoted else None), f"the promoted version {why}; {fallback}"
        if served is None:
            return None, "not loaded yet: the next request loads the promoted version"
        if served != promoted:
            return version, "the promoted version changed since the last request; the next request loads it"
        return version, "serving the promoted version"

    async def follow_reloads(self) -> None:
        """Re-read the registry when any replica got POST /v1/reload: the shared stamp changed. Read at
        most once every RELOAD_CHECK_S, so the cost per request is a clock read."""
        if self.state is None or (time.monotonic() < self.next_stamp_check and not self.stamp_lock.locked()):
            return
        async with self.stamp_lock:  # without it, requests racing the check would resolve the old aliases
            if time.monotonic() < self.next_stamp_check:  # checked while this request waited
                return
            self.next_stamp_check = time.monotonic() + RELOAD_CHECK_S
            try:
                stamp = await self.state.current.remote()
            except Exception as error:  # the stamp replica restarting must not fail a request; refresh_s still applies
                logger.warning("reading the reload stamp failed (%s); aliases refresh every %s s meanwhile", error, self.models.refresh_s)
                return
            if self.seen_stamp is not None and stamp != self.seen_stamp:
                await self.reload_here()
            self.seen_stamp = stamp

    async def reload_here(self) -> dict:
        self.failed.clear()  # a reload retries every failed version now (the operator may have fixed it)
        self.verified.clear()
        return await asyncio.to_thread(self.models.refresh, True)

    # -- inference --------------------------------------------------------------------------------
    def forward(self, checkpoint: GeneratorCheckpoint, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Predictions of the tiles and, for the domain check, their features from the same pass (lmadda.domain)."""
        return forward_scored(checkpoint, torch.from_numpy(tiles).to(self.device))

    # batch_size_fn counts tiles: each call carries up to tile_batch of them, so counting calls let
    # 16 calls make a 64-tile forward.
    @serve.batch(max_batch_size=TILES_PER_FORWARD, batch_wait_timeout_s=0.002, batch_size_fn=lambda items: sum(len(t) for _, t in items))
    async def forward_tiles(self, items: list[tuple[GeneratorCheckpoint, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Micro-batching: tiles of concurrent requests for the same generator run as one forward."""
        outputs: list[tuple[np.ndarray, np.ndarray | None] | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for index, (checkpoint, _) in enumerate(items):
            groups.setdefault(id(checkpoint.generator), []).append(index)
        for indices in groups.values():
            predictions, features = self.forward(items[indices[0]][0], np.concatenate([items[i][1] for i in indices]))
            start = 0
            for i in indices:
                count = len(items[i][1])  # feature rows follow the tiles, so each request gets its own back
                outputs[i] = (predictions[start:start + count], None if features is None else features[start:start + count])
                start += count
        return outputs

    async def stain_image(self, checkpoint: GeneratorCheckpoint, pixels: np.ndarray) -> Stain:
        """`lmadda predict`'s staining routine (`StainPlan`: camera pixels to the markers' camera units and the domain
        score), driven with this replica's forward, which it may await so that concurrent requests share it."""
        plan = StainPlan(checkpoint, pixels, tile=self.tile, overlap=self.overlap)
        for origins, tiles in plan.batches(self.tile_batch):
            # Tiles of concurrent requests share a forward. A request alone on the replica skips the
            # batcher: it would wait batch_wait_timeout_s per tile batch for tiles that never come.
            if self.micro_batch and self.in_flight > 1:
                predictions, tile_features = await self.forward_tiles((checkpoint, tiles))
            else:
                predictions, tile_features = self.forward(checkpoint, tiles)
                if self.micro_batch:  # let requests that arrived meanwhile in: the next tile batch can then be shared
                    await asyncio.sleep(0)
            plan.add(origins, predictions, tile_features)
        return plan.result()

    # -- routes -----------------------------------------------------------------------------------
    def authorise(self, request: Request) -> None:
        problem = origin_problem(request.headers.get("host"), request.headers.get("origin"), bind_host=self.bind_host,
                                 allowed_hosts=self.allowed_hosts)
        if problem is not None:
            raise RequestError(403, problem)
        if not self.auth.accepts(request.headers.get("authorization", "")):
            raise RequestError(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})

    @app.post("/v1/stain", summary="Predict stains for one label-free image",
              response_class=Response, responses={200: {"content": {"image/tiff": {}}}})
    async def stain(self, request: Request, setting: str | None = None, marker: str | None = None) -> Response:
        started = time.perf_counter()
        try:
            self.authorise(request)
            setting = check_name("setting", setting or request.headers.get("x-lmadda-setting", ""))
            markers = parse_markers(marker or request.headers.get("x-lmadda-marker", "dapi"))
            payload = await read_body(request.stream(), declared_length=request.headers.get("content-length"),
                                      max_bytes=self.max_bytes, timeout_s=self.body_timeout_s)
        except RequestError as error:
            return error_response(error)
        except ClientDisconnect:  # nobody reads this answer; it only ends the request
            return error_response(RequestError(400, "the client disconnected before the body arrived"))
        # A compute slot only once the body is here: a client that stalls mid-body holds none.
        async with self.compute_slots:
            self.in_flight += 1
            try:
                return await self.answer(request, payload, setting, markers, started)
            except RequestError as error:
                return error_response(error)
            except LmaddaError as error:
                return error_response(RequestError(400, str(error)))
            finally:
                self.in_flight -= 1

    async def answer(self, request: Request, payload: bytes, setting: str, markers: list[str], started: float) -> Response:
        """The stains of one read request body: decode, stain with each marker's served model, encode."""
        await self.follow_reloads()
        content_type = request.headers.get("content-type")
        _, samples = declared_request(payload, content_type, max_bytes=self.max_bytes, max_megapixels=self.max_megapixels)
        async with self.budget.hold(samples / 1e6):
            image = decode_request_image(payload, content_type, max_bytes=self.max_bytes, max_megapixels=self.max_megapixels,
                                         min_side=self.min_side)
            return await self.stain_markers(request, image, setting, markers, started)

    async def stain_markers(self, request: Request, image, setting: str, markers: list[str], started: float) -> Response:
        """The stains of one decoded image, with each marker's served model, as the TIFF response."""
        channels, described, versions, dtypes, fallbacks, domains, warnings = [], [], [], set(), [], [], []
        for name in markers:
            model_id, checkpoint, promoted = await self.model_for(name, setting)
            if model_id != promoted:
                fallbacks.append(f"{promoted} failed to load, served {model_id}")
            check_channels(image, checkpoint.config.in_channels)  # the served version passed its contract: the image is wrong
            # lmadda predict's check, before the work: the image's pixel size against the model's training one
            note = check_pixel_size(image.pixel_size, checkpoint.pixel_size_um, image_name="the image",
                                    model_name=f"models:/{model_id}")
            if note is not None and note.level == "warning":
                warnings.append(note.message)
            stained = await self.stain_image(checkpoint, image.pixels)
            domains.append(stained.domain)
            self.domain_tallies.setdefault((name, setting), DomainTally()).add(stained.domain)
            channels.append(stained.camera[checkpoint.markers.index(name)])
            versions.append(model_id)
            dtypes.add(checkpoint.target_dtype)
            norm = checkpoint.target_norm.to_dict() if checkpoint.target_norm else None
            described.append({"marker": name, "model": model_id, "setting": setting, "target_norm": norm})
        dtype = "float32" if len(dtypes) > 1 else dtypes.pop()
        metadata = {"lmadda_markers": ",".join(markers), "lmadda_setting": setting, "lmadda_models": described}
        body = encode_tiff(np.stack(channels) if len(channels) > 1 else channels[0], dtype, metadata, pixel_size=image.pixel_size)
        return Response(body, media_type="image/tiff", headers={
            "X-Lmadda-Models": ",".join(versions), "X-Lmadda-Setting": setting, "X-Lmadda-Markers": ",".join(markers),
            "X-Lmadda-Seconds": f"{time.perf_counter() - started:.4f}",
            **({"X-Lmadda-Fallback": "; ".join(fallbacks)} if fallbacks else {}), **domain_headers(*domains),
            **pixel_size_headers(image.pixel_size, warnings)})

    @app.get("/v1/models", summary="Settings and markers: the promoted and the served version (and why they differ), selection metrics")
    async def list_models(self, request: Request) -> JSONResponse:
        try:
            self.authorise(request)
        except RequestError as error:
            return error_response(error)
        await self.follow_reloads()
        table = await asyncio.to_thread(self.models.refresh)
        shared = await self.shared_view()
        rows = []
        for ref in sorted(table.values(), key=lambda r: (r.marker, r.setting)):
            served, status = self.served_state(ref.marker, ref.setting, ref.model_id, shared)
            rows.append({"marker": ref.marker, "setting": ref.setting, "model": ref.name, "promoted_version": ref.version,
                         "served_version": served, "status": status, "uri": f"models:/{ref.name}@{ref.setting}", "tags": dict(ref.tags),
                         # the domain check of the images stained on this replica since it started (lmadda.domain)
                         "domain": self.domain_tallies.get((ref.marker, ref.setting), DomainTally()).as_dict()})
        # what this replica admits at once (the budget is per replica; the models are the service's)
        return JSONResponse({"models": rows, "replica": self.budget.as_dict()})

    @app.post("/v1/reload", summary="Re-read the registry aliases now (after promoting a new champion)")
    async def reload(self, request: Request) -> JSONResponse:
        try:
            self.authorise(request)
        except RequestError as error:
            return error_response(error)
        if self.state is not None:  # the other replicas see the new stamp within RELOAD_CHECK_S
            self.seen_stamp = await self.state.bump.remote()
        table = await self.reload_here()
        return JSONResponse({"models": len(table), "replicas": f"every replica re-reads the registry within {RELOAD_CHECK_S:g} s"})

    @app.get("/healthz", summary="Liveness")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    # /healthz and /readyz stay open for probes (a kubelet sends no token). /readyz therefore says
    # only ready or not and a count: the cause of a failure (which can name the registry's address
    # or credentials in a URI) goes to the replica log, not to an anonymous caller.
    @app.get("/readyz", summary="Readiness: the registry answers and holds at least one model")
    async def readyz(self) -> JSONResponse:
        try:
            table = await asyncio.to_thread(self.models.refresh)
        except Exception as error:  # an unreachable registry is not ready, whatever the cause
            logger.error("readiness: the registry %s is unreachable (%s)", self.models.tracking_uri, error)
            return JSONResponse({"status": "registry unreachable; the replica log has the cause"}, status_code=503)
        if not table:
            return JSONResponse({"status": "no models registered; promote a sweep first"}, status_code=503)
        return JSONResponse({"status": "ready", "models": len(table)})


def _serve_args_model() -> type[BaseModel]:
    """The serve args as `StainService.__init__` declares them (names, types and defaults are written once,
    there), as a strict model: an unknown name or a wrongly typed value is refused before Serve starts."""
    init = StainService.func_or_class.__mro__[1].__init__  # the class as written, under Serve's ASGI wrapper
    hints = typing.get_type_hints(init)
    fields = {name: (hints[name], parameter.default) for name, parameter in inspect.signature(init).parameters.items()
              if name in hints}
    # strict: YAML's "false" in quotes is a string, and a string would pass for true
    return create_model("ServeArgs", __config__=ConfigDict(extra="forbid", strict=True), **fields)


ServeArgs = _serve_args_model()
ARG_NAMES = tuple(ServeArgs.model_fields)


def check_args(args: dict) -> dict:
    """`args` as given, once they validate as `ServeArgs`; else a ValueError naming the arg and the fix."""
    try:
        ServeArgs.model_validate(args)
    except ValidationError as error:
        unknown = sorted(str(e["loc"][0]) for e in error.errors() if e["type"] == "extra_forbidden")
        if unknown:
            raise ValueError(f"unknown serve args {unknown}; known: {', '.join(ARG_NAMES)}") from None
        first = error.errors()[0]
        name = first["loc"][0]
        if first["type"] == "bool_type":
            raise ValueError(f"serve arg {name} is {first['input']!r}; write true or false without quotes") from None
        raise ValueError(f"serve arg {name} is {first['input']!r}: {first['msg']}") from None
    return args


def application(args: dict, deployment: dict | None = None) -> serve.Application:
    """StainService with `args` (and deployment options), bound to the shared service state."""
    service = StainService.options(**deployment) if deployment else StainService
    return service.bind(**check_args(args), state=ServiceState.bind())


def build_app(args: dict) -> serve.Application:
    """The application builder `serve run serve/config.yaml` calls with the config's `args`."""
    return application(args)
