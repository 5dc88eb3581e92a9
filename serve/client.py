"""A small client for the staining endpoint (what `lmadda stain` runs); standard library only."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from lmadda.core.atomic import write_atomically
from lmadda.core.errors import LmaddaError

CONTENT_TYPE_BY_SUFFIX = {".tif": "image/tiff", ".tiff": "image/tiff", ".png": "image/png"}


def stain_remote(url: str, image: Path, *, setting: str, markers: str = "dapi", out: Path | None = None,
                 token: str | None = None, timeout: float = 300.0) -> tuple[Path, dict]:
    """POST `image` to `url`/v1/stain; write the returned TIFF to `out` (default: beside the input)."""
    image = Path(image)
    content_type = CONTENT_TYPE_BY_SUFFIX.get(image.suffix.lower())
    if content_type is None:
        raise LmaddaError(f"{image}: send a .tif/.tiff or .png image")
    if not image.is_file():
        raise LmaddaError(f"{image}: file not found")
    out = Path(out) if out else image.with_name(f"{image.stem}.{setting}.{markers.replace(',', '_')}.tif")
    query = urllib.parse.urlencode({"setting": setting, "marker": markers})
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/stain?{query}", data=image.read_bytes(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body, response_headers = response.read(), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            message = json.loads(raw)["error"]
        except Exception:  # not our JSON error body (a proxy, an old server): show what came back
            message = raw[:300].decode(errors="replace")
        raise LmaddaError(f"the endpoint answered {error.code}: {message}") from error
    except urllib.error.URLError as error:
        raise LmaddaError(f"cannot reach {url} ({error.reason}); is `lmadda serve` running, and is the URL right?") from error
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, lambda temporary: temporary.write_bytes(body))
    return out, response_headers


def token_from_env(name: str = "LMADDA_SERVE_TOKEN") -> str | None:
    """The bearer token: $`name`, else the one `lmadda serve` made and stored for this user (lmadda_serve.auth.token_file)."""
    from lmadda_serve.auth import stored_token

    return os.environ.get(name) or stored_token()
