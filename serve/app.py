"""The Ray Serve application: `POST /v1/stain` turns a label-free image into predicted stains.

    serve run serve/config.yaml                       # Serve's config format (also the RayService's)
    lmadda serve --tracking-uri sqlite:///$PWD/demo-out/sweeps/mlflow.db

One deployment, `StainService`, behind a FastAPI ingress:
- models come from the MLflow registry by alias (`models:/lmadda-<marker>@<setting>`) through Serve
  model multiplexing (an LRU of `MODELS_PER_REPLICA` generators per replica), keyed by registry
  name and version, so promoting a new champion yields a new key and is served after the next alias
  refresh (`refresh_s`, or `POST /v1/reload`), and a version that fails to load leaves the previous
  one serving;
- the image is tiled exactly as `lmadda predict` tiles it (`lmadda.inference.TilePlan`), and tiles
  of concurrent requests for the same model are micro-batched into one forward (`@serve.batch`);
- requests beyond `max_in_flight` per replica get 503 with Retry-After instead of queueing without
  bound; an optional bearer token (environment variable `token_env`) guards every /v1 route.
"""


import asyncio
import hmac
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from lmadda.checkpoint import GeneratorCheckpoint
from lmadda.data.dataset import target_from_model_range
from lmadda.errors import LmaddaError
from lmadda.inference import TilePlan, default_device, model_input, to_camera_units
from serve.codec import RequestError, check_body_size, check_channels, check_name, decode_request_image, encode_tiff, parse_markers
from serve.registry import StainModels

logger = logging.getLogger("ray.serve")
MODELS_PER_REPLICA = 8  # generators kept per replica (LRU); a 16-layer ngf=64 generator is ~200 MB
app = FastAPI(title="lmadda virtual staining", version="1",
              description="Post a label-free microscopy image (TIFF or PNG body); get the predicted fluorescence stains as a TIFF.")


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'demo-out' / 'sweeps' / 'mlflow.db'}"


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers or None)


@serve.deployment(name="StainService", max_ongoing_requests=32)
@serve.ingress(app)
class StainService:
    def __init__(self, tracking_uri: str | None = None, *, cache_dir: str | None = None, refresh_s: float = 30.0,
                 max_body_mb: float = 256.0, max_in_flight: int = 8, tile: int = 256, overlap: float = 0.25,
                 tile_batch: int = 4, micro_batch: bool = True, token_env: str = "LMADDA_SERVE_TOKEN"):
        self.models = StainModels(tracking_uri or default_tracking_uri(),
                                  cache_dir or Path(tempfile.gettempdir()) / "lmadda-serve-models", refresh_s)
        self.max_bytes = int(max_body_mb * 2**20)
        self.max_in_flight = max_in_flight
        self.tile, self.overlap, self.tile_batch, self.micro_batch = tile, overlap, tile_batch, micro_batch
        self.token = os.environ.get(token_env) or None
        self.device = default_device()
        self.in_flight = 0
        self.serving: dict[tuple[str, str], str] = {}  # (marker, setting) -> model id of the last good load

    # -- models ---------------------------------------------------------------------------------
    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def get_model(self, model_id: str) -> GeneratorCheckpoint:
        checkpoint = await asyncio.to_thread(self.models.load, model_id)
        checkpoint.generator.eval().to(self.device)
        return checkpoint

    async def model_for(self, marker: str, setting: str) -> tuple[str, GeneratorCheckpoint]:
        """The current champion for (marker, setting); on a failed load, the previous good version."""
        ref = self.models.resolve(marker, setting)
        try:
            checkpoint = await self.get_model(ref.model_id)
            self.serving[(marker, setting)] = ref.model_id
            return ref.model_id, checkpoint
        except Exception as error:  # a broken new version must not take the service down
            previous = self.serving.get((marker, setting))
            logger.error("loading %s failed (%s); %s", ref.model_id, error, f"serving {previous}" if previous else "nothing to fall back to")
            if previous is None or previous == ref.model_id:
                raise RequestError(503, f"model {ref.model_id} for {marker}@{setting} cannot be loaded; the operator has been logged the cause",
                                   {"Retry-After": "30"}) from error
            return previous, await self.get_model(previous)

    # -- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, generator, tiles: np.ndarray) -> np.ndarray:
        return generator(torch.from_numpy(tiles).to(self.device)).float().cpu().numpy()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def forward_tiles(self, items: list[tuple[GeneratorCheckpoint, np.ndarray]]) -> list[np.ndarray]:
        """Micro-batching: tiles of concurrent requests for the same generator run as one forward."""
        outputs: list[np.ndarray | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for index, (checkpoint, _) in enumerate(items):
            groups.setdefault(id(checkpoint.generator), []).append(index)
        for indices in groups.values():
            predictions = self.forward(items[indices[0]][0].generator, np.concatenate([items[i][1] for i in indices]))
            start = 0
            for i in indices:
                count = len(items[i][1])
                outputs[i] = predictions[start:start + count]
                start += count
        return outputs

    async def stain_image(self, checkpoint: GeneratorCheckpoint, pixels: np.ndarray) -> np.ndarray:
        """`lmadda predict`'s arithmetic: normalise, tile, blend, back to the marker's camera units."""
        plan = TilePlan(model_input(pixels, checkpoint), checkpoint.config, tile=self.tile, overlap=self.overlap)
        for origins, tiles in plan.batches(self.tile_batch):
            if self.micro_batch:  # tiles of concurrent requests share a forward
                plan.add(origins, await self.forward_tiles((checkpoint, tiles)))
            else:
                plan.add(origins, self.forward(checkpoint.generator, tiles))
        return to_camera_units(target_from_model_range(plan.result()), checkpoint)

    # -- routes -----------------------------------------------------------------------------------
    def authorise(self, request: Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise RequestError(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})

    @app.post("/v1/stain", summary="Predict stains for one label-free image",
              response_class=Response, responses={200: {"content": {"image/tiff": {}}}})
    async def stain(self, request: Request, setting: str | None = None, marker: str | None = None) -> Response:
        if self.in_flight >= self.max_in_flight:
            return error_response(RequestError(503, f"busy: {self.in_flight} requests in progress on this replica; retry shortly", {"Retry-After": "1"}))
        self.in_flight += 1
        started = time.perf_counter()
        try:
            self.authorise(request)
            setting = check_name("setting", setting or request.headers.get("x-lmadda-setting", ""))
            markers = parse_markers(marker or request.headers.get("x-lmadda-marker", "dapi"))
            declared = request.headers.get("content-length", "")
            if declared.isdigit():  # refuse before reading it into memory
                check_body_size(int(declared), self.max_bytes)
            image = decode_request_image(await request.body(), request.headers.get("content-type"), max_bytes=self.max_bytes)
            channels, described, versions, dtypes = [], [], [], set()
            for name in markers:
                model_id, checkpoint = await self.model_for(name, setting)
                check_channels(image, checkpoint.config.in_channels)
                if name not in checkpoint.markers:
                    raise RequestError(500, f"model {model_id} does not predict {name} (it predicts {checkpoint.markers})")
                stains = await self.stain_image(checkpoint, image.pixels)
                channels.append(stains[checkpoint.markers.index(name)])
                versions.append(model_id)
                dtypes.add(checkpoint.target_dtype)
                norm = checkpoint.target_norm.to_dict() if checkpoint.target_norm else None
                described.append({"marker": name, "model": model_id, "setting": setting, "target_norm": norm})
            dtype = "float32" if len(dtypes) > 1 else dtypes.pop()
            metadata = {"lmadda_markers": ",".join(markers), "lmadda_setting": setting, "lmadda_models": described}
            body = encode_tiff(np.stack(channels) if len(channels) > 1 else channels[0], dtype, metadata)
            return Response(body, media_type="image/tiff", headers={
                "X-Lmadda-Models": ",".join(versions), "X-Lmadda-Setting": setting, "X-Lmadda-Markers": ",".join(markers),
                "X-Lmadda-Seconds": f"{time.perf_counter() - started:.4f}"})
        except RequestError as error:
            return error_response(error)
        except LmaddaError as error:
            return error_response(RequestError(400, str(error)))
        finally:
            self.in_flight -= 1

    @app.get("/v1/models", summary="Settings and markers served, with registry versions and selection metrics")
    async def list_models(self, request: Request) -> JSONResponse:
        try:
            self.authorise(request)
        except RequestError as error:
            return error_response(error)
        table = await asyncio.to_thread(self.models.refresh)
        return JSONResponse({"models": [
            {"marker": ref.marker, "setting": ref.setting, "model": ref.name, "version": ref.version,
             "uri": f"models:/{ref.name}@{ref.setting}", "tags": dict(ref.tags)}
            for ref in sorted(table.values(), key=lambda r: (r.marker, r.setting))]})

    @app.post("/v1/reload", summary="Re-read the registry aliases now (after promoting a new champion)")
    async def reload(self, request: Request) -> JSONResponse:
        try:
            self.authorise(request)
        except RequestError as error:
            return error_response(error)
        table = await asyncio.to_thread(self.models.refresh, True)
        return JSONResponse({"models": len(table)})

    @app.get("/healthz", summary="Liveness")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the registry answers and holds at least one model")
    async def readyz(self) -> JSONResponse:
        try:
            table = await asyncio.to_thread(self.models.refresh)
        except Exception as error:  # an unreachable registry is not ready, whatever the cause
            return JSONResponse({"status": "registry unreachable", "detail": str(error)}, status_code=503)
        if not table:
            return JSONResponse({"status": "no models registered; promote a sweep first"}, status_code=503)
        return JSONResponse({"status": "ready", "models": len(table)})


ARG_NAMES = ("tracking_uri", "cache_dir", "refresh_s", "max_body_mb", "max_in_flight", "tile", "overlap", "tile_batch",
             "micro_batch", "token_env")


def check_args(args: dict) -> dict:
    unknown = set(args) - set(ARG_NAMES)
    if unknown:
        raise ValueError(f"unknown serve args {sorted(unknown)}; known: {', '.join(ARG_NAMES)}")
    return args


def build_app(args: dict) -> serve.Application:
    """The application builder `serve run serve/config.yaml` calls with the config's `args`."""
    return StainService.bind(**check_args(args))
