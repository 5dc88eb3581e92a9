"""The models the endpoint serves: MLflow registry aliases `models:/lmadda-<marker>@<setting>`.

A (marker, setting) pair resolves to a registered version through its alias; the version's
generator is downloaded once into a cache folder named by model and version (never by user input)
and loaded with lmadda's own checkpoint loader, so it accepts any image size.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from lmadda.checkpoint import GeneratorCheckpoint, load_checkpoint
from lmadda.errors import LmaddaError
from serve.codec import RequestError

MODEL_PREFIX = "lmadda-"


@dataclass(frozen=True)
class ModelRef:
    marker: str
    setting: str
    name: str
    version: str
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def model_id(self) -> str:
        """The multiplexed model id: a registry name and version, both from the registry itself."""
        return f"{self.name}/{self.version}"


class StainModels:
    """Alias lookups (refreshed every `refresh_s` seconds) and model loading from an MLflow registry."""

    def __init__(self, tracking_uri: str, cache_dir: str | Path, refresh_s: float = 30.0):
        self.tracking_uri = tracking_uri
        self.cache_dir = Path(cache_dir)
        self.refresh_s = refresh_s
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._lock = threading.Lock()
        self._table: dict[tuple[str, str], ModelRef] = {}
        self._loaded_at = -float("inf")

    def refresh(self, force: bool = False) -> dict[tuple[str, str], ModelRef]:
        """(marker, setting) -> ModelRef for every alias in the registry; cached for refresh_s."""
        with self._lock:
            if not force and time.monotonic() - self._loaded_at < self.refresh_s:
                return self._table
            table = {}
            for model in self._client.search_registered_models(f"name LIKE '{MODEL_PREFIX}%'"):
                marker = model.name[len(MODEL_PREFIX):]
                for alias, version in (model.aliases or {}).items():
                    details = self._client.get_model_version(model.name, str(version))
                    table[(marker, alias)] = ModelRef(marker, alias, model.name, str(version), tuple(sorted((details.tags or {}).items())))
            self._table, self._loaded_at = table, time.monotonic()
            return table

    def resolve(self, marker: str, setting: str) -> ModelRef:
        table = self.refresh()
        ref = table.get((marker, setting))
        if ref is None:
            settings = sorted({s for m, s in table if m == marker})
            if settings:
                raise RequestError(404, f"no model for marker {marker!r} at setting {setting!r}; settings with a {marker} model: {', '.join(settings)}")
            markers = sorted({m for m, _ in table})
            raise RequestError(404, f"no model for marker {marker!r}; served markers: {', '.join(markers) or 'none (promote a sweep first)'}")
        return ref

    def load(self, model_id: str) -> GeneratorCheckpoint:
        """Download (once) and load the generator of `model_id` ('lmadda-<marker>/<version>')."""
        name, _, version = model_id.partition("/")
        if not (name.startswith(MODEL_PREFIX) and version.isdigit()):
            raise LmaddaError(f"malformed model id {model_id!r}")
        folder = self.cache_dir / name / version
        found = sorted(folder.rglob("*.pt")) if folder.is_dir() else []
        if not found:
            uri = self._client.get_model_version_download_uri(name, version)
            partial = self.cache_dir / name / f".{version}.partial"
            partial.mkdir(parents=True, exist_ok=True)
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(partial), tracking_uri=self.tracking_uri)
            partial.replace(folder)  # a complete download only, so a crash never leaves a half file in the cache
            found = sorted(folder.rglob("*.pt"))
        if len(found) != 1:
            raise LmaddaError(f"model {model_id} holds {len(found)} checkpoint files; expected one generator .pt")
        return load_checkpoint(found[0])
