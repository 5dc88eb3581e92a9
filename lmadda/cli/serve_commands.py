"""`lmadda serve` (the Ray Serve endpoint, locally) and `lmadda stain` (its client)."""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

DEMO_SHIFT = "overexposure:2.5"


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="start the virtual-staining HTTP endpoint on a local Ray instance",
                                  description="Starts serve/config.yaml's application; models come from the MLflow registry "
                                              "(aliases models:/lmadda-<marker>@<setting>, set by `lmadda sweep promote`).")
    serve.add_argument("--config", type=Path, default=None, help="Serve config (default: serve/config.yaml)")
    serve.add_argument("--tracking-uri", default=None, help="MLflow registry (default: $MLFLOW_TRACKING_URI or the demo's SQLite store)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="bind address (default 127.0.0.1, this machine only; 0.0.0.0 accepts other machines). Auth is "
                            "on everywhere: the token comes from $LMADDA_SERVE_TOKEN (or the config's token_env / token_sha256), "
                            "else lmadda serve makes one and stores it for this user; turn auth off only on purpose, with "
                            "allow_unauthenticated: true in the config")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local Ray instance")
    serve.add_argument("--demo", type=Path, default=None, metavar="DEMO_OUT",
                       help="start, stain one overexposed demo image through HTTP, write the stain beside it, stop (what `make demo` runs)")
    serve.set_defaults(func=run_serve)

    stain = subparsers.add_parser("stain", help="send an image to a running endpoint and save the predicted stains")
    stain.add_argument("image", type=Path, help="label-free image (.tif/.tiff/.png)")
    stain.add_argument("--setting", required=True, help="microscope setting (an alias in the registry, e.g. bright_field)")
    stain.add_argument("--marker", default="dapi", help="marker(s), comma-separated: dapi or dapi,cd29")
    stain.add_argument("-o", "--out", type=Path, default=None, help="output TIFF (default: beside the input)")
    stain.add_argument("--url", default="http://127.0.0.1:8000")
    stain.add_argument("--token-env", default="LMADDA_SERVE_TOKEN", help="environment variable holding the bearer token, if any")
    stain.set_defaults(func=run_stain)


def run_stain(args: argparse.Namespace) -> int:
    from lmadda.data.io import refuse_overwriting_inputs
    from lmadda_serve.client import stain_remote, token_from_env

    refuse_overwriting_inputs([("--out", args.out)], [("IMAGE", args.image)])  # the default --out is a new name beside IMAGE
    out, headers = stain_remote(args.url, args.image, setting=args.setting, markers=args.marker, out=args.out,
                                token=token_from_env(args.token_env))
    print(f"{out}  (models {headers.get('x-lmadda-models')}, {headers.get('x-lmadda-seconds')} s on the server)")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from lmadda_serve.local import DEFAULT_CONFIG, read_serve_config, start_local, with_launcher_token

    config = read_serve_config(args.config or DEFAULT_CONFIG)  # a bad config fails here, before Ray starts
    announce_token(config["args"])
    with_launcher_token(config["args"], args.host, os.environ)  # and so does a config that turns auth off wrongly
    tracking_uri = args.tracking_uri
    if args.demo is not None and tracking_uri is None:
        tracking_uri = f"sqlite:///{(args.demo / 'sweeps' / 'mlflow.db').resolve()}"
    demo_input = _demo_input(args.demo) if args.demo is not None else None  # before Ray: fail fast on a missing demo

    import ray
    from ray import serve

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=args.num_cpus, log_to_driver=False)
    stop_on_sigterm()  # after ray.init, which installs its own SIGTERM handler
    try:
        url = start_local(args.config or DEFAULT_CONFIG, host=args.host, port=args.port, tracking_uri=tracking_uri)
        print(f"[serve] endpoint at {url}  (POST {url}/v1/stain, GET {url}/v1/models, docs at {url}/docs)")
        if demo_input is not None:
            return _stain_demo_image(url, *demo_input)
        print("[serve] Ctrl-C or SIGTERM stops it")
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        if started_ray:  # not left to atexit: the local instance's agents go with it, whatever stopped us
            ray.shutdown()


def announce_token(serve_args: dict) -> None:
    """Auth is on unless the config turns it off: without a token in the environment or the config, use the stored
    one or make one (lmadda_serve.auth.launcher_token), put it in this process's environment for the replicas'
    digest, and say where it is (the token itself only when it is new)."""
    from lmadda_serve.auth import launcher_token, token_file

    token_env = serve_args.get("token_env", "LMADDA_SERVE_TOKEN")
    if os.environ.get(token_env, "").strip() or serve_args.get("token_sha256") or serve_args.get("allow_unauthenticated"):
        return
    token, created = launcher_token()
    os.environ[token_env] = token
    if created:
        print(f"[serve] auth ON: made a token and stored it in {token_file()} (mode 0600); `lmadda stain` reads it there. "
              f"Other clients send 'Authorization: Bearer <token>'; the token, shown this once: {token}")
    else:
        print(f"[serve] auth ON: the token stored in {token_file()} (`lmadda stain` reads it there)")


def stop_on_sigterm() -> None:
    """Make SIGTERM stop `lmadda serve` exactly as Ctrl-C does (KeyboardInterrupt, then the `finally`).

    Ray's driver handles SIGTERM by aborting the process, which skips Serve's and Ray's shutdown and left
    the local instance's dashboard and runtime-env agents running. A second SIGTERM while shutting
    down is ignored, so it cannot cut the shutdown short (SIGKILL still can).
    """
    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def _demo_input(demo_out: Path) -> tuple[Path, str]:
    """An overexposed (x2.5) test-split phase-contrast image from the demo, written as a TIFF."""
    from lmadda.data.io import read_image, write_tiff
    from lmadda.data.manifest import Manifest
    from lmadda.data.shifts import Shift
    from lmadda.errors import LmaddaError
    from lmadda_tune.tracking import alias_for

    manifest_path = demo_out / "data" / "manifest.parquet"
    if not manifest_path.is_file():
        raise LmaddaError(f"{manifest_path} not found; run `make demo` (or `lmadda demo --out {demo_out}`) first")
    manifest = Manifest.load(manifest_path)
    row = manifest.inputs("phase_contrast", "test")[0]
    raw = read_image(manifest.resolve(row))
    shift = Shift.parse(DEMO_SHIFT)
    pixels = shift.apply_input(raw.pixels, raw.sensor_max)
    path = write_tiff(demo_out / "serve" / f"{row.field}_phase_contrast_{DEMO_SHIFT.replace(':', '_').replace('.', '_')}.tif",
                      pixels[0], dtype=raw.dtype)
    return path, alias_for(f"phase_contrast+{DEMO_SHIFT}")


def _stain_demo_image(url: str, image: Path, setting: str) -> int:
    from lmadda_serve.client import stain_remote

    started = time.perf_counter()
    out, headers = stain_remote(url, image, setting=setting, markers="dapi,cd29")
    print(f"[serve] stained {image.name} through HTTP in {time.perf_counter() - started:.2f} s "
          f"(setting {setting}, models {headers.get('x-lmadda-models')}) -> {out}")
    return 0
