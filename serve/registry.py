"""The models the endpoint serves: MLflow registry aliases `models:/lmadda-<marker>@<setting>`.

A (marker, setting) pair resolves to a registered version through its alias (the names are
`lmadda.core.registry_names`'); the version's generator is downloaded once into a cache folder named by
model and version (never by user input) and loaded with lmadda's own checkpoint loader, so it
accepts any image size. A version promoted since lmadda records promotions as MLflow LoggedModels
has the source `models:/<model_id>` and its file in the LoggedModel's artifacts; one registered
before points at its run's artifact (`runs:/...`). The registry resolves either to a download URI,
so both are served alike.

The cache is verified, not trusted. It is a trust boundary: whoever can write it chooses the weights
every replica on the node serves. So:
- it lives in a per-user folder (`default_cache_dir`: $XDG_CACHE_HOME/lmadda/serve-models, else
  ~/.cache/...), kept at mode 0700; a cache folder owned by another user is refused, one of ours that
  others can read or write is closed to 0700;
- it is keyed by the registry (a digest of the tracking URI), model name and version, so a file from
  another registry with the same name and version is never taken for this one's;
- every load, not only the download, checks the file's SHA-256 against the registry's `sha256` tag of
  the version (set at promotion); the record written beside the file at download is only a fallback
  for versions without the tag, since anyone who can replace the file can rewrite the record too;
- a cached file that does not match, or that fails to load, is thrown away and downloaded again, so
  a corrupt download does not outlive the fix of the file in the registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from lmadda.checkpoint import GeneratorCheckpoint, load_checkpoint
from lmadda.core.errors import LmaddaError
from lmadda.core.registry_names import MODEL_PREFIX, SHA256_TAG, file_sha256, marker_of
from lmadda.core.tracking_store import relocate_artifacts
from lmadda_serve.codec import RequestError

logger = logging.getLogger("ray.serve")

CACHE_RECORD = ".lmadda-cache.json"  # {"file", "size", "sha256"} of the downloaded generator


def default_cache_dir() -> Path:
    """The per-user model cache (never a shared, predictable path such as /tmp/lmadda-serve-models)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmadda" / "serve-models"


def private_folder(path: Path) -> Path:
    """`path` created if missing, owned by this user and closed to others (0700); LmaddaError for a folder another
    user owns (they could replace the generators it holds)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise LmaddaError(f"model cache {path} belongs to uid {info.st_uid}, not this user ({os.getuid()}): whoever owns it decides "
                          "which weights are served. Give the endpoint a cache_dir of its own (or leave it unset: "
                          f"{default_cache_dir()})")
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)
        logger.warning("model cache %s was open to other users (mode %o); closed it to 0700", path, stat.S_IMODE(info.st_mode))
    return path


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

    def __init__(self, tracking_uri: str, cache_dir: str | Path | None = None, refresh_s: float = 30.0):
        self.tracking_uri = tracking_uri
        # One subfolder per registry: name and version alone do not identify a file across registries.
        registry = hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]
        self.cache_dir = private_folder(Path(cache_dir) if cache_dir else default_cache_dir()) / registry
        self.refresh_s = refresh_s
        relocate_artifacts(tracking_uri)  # a moved or copied local store: its artifacts are where it is now
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
                marker = marker_of(model.name)
                if marker is None:
                    continue
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
        """Load the generator of `model_id` ('lmadda-<marker>/<version>') from the cache, downloading it
        when absent; a cached copy that fails verification or loading is downloaded again once."""
        name, _, version = model_id.partition("/")
        if marker_of(name) is None or not version.isdigit():
            raise LmaddaError(f"malformed model id {model_id!r}")
        folder = self.cache_dir / name / version
        expected = self.registered_sha256(name, version)
        if folder.is_dir():
            try:
                return load_checkpoint(self._verified(folder, model_id, expected))
            except LmaddaError as error:  # a poisoned or stale cache: the registry's copy decides
                logger.warning("cached %s is unusable (%s); downloading it again", model_id, error)
                shutil.rmtree(folder, ignore_errors=True)
        self._download(name, version, folder, expected)
        return load_checkpoint(self._verified(folder, model_id, expected))

    def registered_sha256(self, name: str, version: str) -> str | None:
        """The version's `sha256` tag, read from the registry at every load (None for versions promoted without it)."""
        tag = (self._client.get_model_version(name, version).tags or {}).get(SHA256_TAG)
        return tag.lower() if tag else None

    def _download(self, name: str, version: str, folder: Path, expected: str | None) -> None:
        """Download into a partial folder, record size and hash, then rename into place (a crash never
        leaves a half file in the cache)."""
        uri = self._client.get_model_version_download_uri(name, version)
        (self.cache_dir / name).mkdir(parents=True, exist_ok=True)
        # One partial folder per download: replicas on one node share the cache and may race.
        partial = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".partial", dir=self.cache_dir / name))
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(partial), tracking_uri=self.tracking_uri)
        found = sorted(partial.rglob("*.pt"))
        if len(found) != 1:
            shutil.rmtree(partial, ignore_errors=True)
            raise LmaddaError(f"model {name}/{version} holds {len(found)} checkpoint files; expected one generator .pt")
        actual = file_sha256(found[0])
        if expected and expected != actual:
            shutil.rmtree(partial, ignore_errors=True)
            raise LmaddaError(f"model {name}/{version}: the download's SHA-256 {actual[:12]}... differs from the registered "
                              f"{expected[:12]}...; the registry's file is damaged: register the generator again")
        record = {"file": found[0].relative_to(partial).as_posix(), "size": found[0].stat().st_size, "sha256": actual}
        (partial / CACHE_RECORD).write_text(json.dumps(record))
        try:
            partial.replace(folder)
        except OSError:  # another replica put its (verified) copy there first
            shutil.rmtree(partial, ignore_errors=True)

    @staticmethod
    def _verified(folder: Path, model_id: str, expected: str | None) -> Path:
        """The cached generator file, after checking its SHA-256 against the registry's tag (`expected`), or
        against the download record where the version has no tag."""
        try:
            record = json.loads((folder / CACHE_RECORD).read_text())
            path = folder / record["file"]
            size = path.stat().st_size
        except (OSError, ValueError, KeyError) as error:
            raise LmaddaError(f"cache of {model_id} at {folder} has no valid download record ({error})") from error
        actual = file_sha256(path)
        if expected is not None and actual != expected:
            raise LmaddaError(f"cached {model_id} at {path} has SHA-256 {actual[:12]}..., the registry's tag says {expected[:12]}...")
        if expected is None and (size != record["size"] or actual != record["sha256"]):
            raise LmaddaError(f"cached {model_id} at {path} changed since it was downloaded (size {size}, recorded {record['size']})")
        return path
