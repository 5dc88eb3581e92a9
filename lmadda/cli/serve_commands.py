"""`lmadda serve` (the Ray Serve endpoint, locally) and `lmadda stain` (its client)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="start the virtual-staining HTTP endpoint on a local Ray instance",
                                  description="Starts serve/config.yaml's application; models come from the MLflow registry "
                                              "(aliases models:/lmadda-<marker>@<setting>, set by `lmadda sweep promote`).")
    serve.add_argument("--config", type=Path, default=None, help="Serve config (default: serve/config.yaml)")
    serve.add_argument("--tracking-uri", default=None, help="MLflow registry (default: $MLFLOW_TRACKING_URI; with --demo, the demo's SQLite store)")
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
    from lmadda.demo import served_registry, serving_input
    from lmadda_serve.local import DEFAULT_CONFIG, read_serve_config, serve_until_stopped, with_launcher_token

    config = read_serve_config(args.config or DEFAULT_CONFIG)  # a bad config fails here, before Ray starts
    announce_token(config["args"])
    with_launcher_token(config["args"], args.host, os.environ)  # and so does a config that turns auth off wrongly
    tracking_uri = args.tracking_uri
    if args.demo is not None and tracking_uri is None:
        tracking_uri = served_registry(args.demo)
    demo_input = serving_input(args.demo) if args.demo is not None else None  # before Ray: fail fast on a missing demo

    token_env = config["args"].get("token_env", "LMADDA_SERVE_TOKEN")
    then = (lambda url: _stain_demo_image(url, *demo_input, token_env=token_env)) if demo_input is not None else None
    return serve_until_stopped(args.config or DEFAULT_CONFIG, host=args.host, port=args.port, tracking_uri=tracking_uri,
                               num_cpus=args.num_cpus, then=then)


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


def _stain_demo_image(url: str, image: Path, setting: str, *, token_env: str = "LMADDA_SERVE_TOKEN") -> int:
    """Stain the demo's image through HTTP as any client does: with the bearer token (auth is on, loopback included)."""
    from lmadda_serve.client import stain_remote, token_from_env

    started = time.perf_counter()
    out, headers = stain_remote(url, image, setting=setting, markers="dapi,cd29", token=token_from_env(token_env))
    print(f"[serve] stained {image.name} through HTTP in {time.perf_counter() - started:.2f} s "
          f"(setting {setting}, models {headers.get('x-lmadda-models')}) -> {out}")
    return 0
