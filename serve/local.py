"""Run the endpoint on a local Ray instance from `serve/config.yaml` (what `lmadda serve` does)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import yaml

from lmadda.core.errors import LmaddaError

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")


def read_serve_config(path: Path = DEFAULT_CONFIG) -> dict:
    """The lmadda application of a Serve config file: {'args', 'deployment', 'http_options', 'controller_options',
    'name', 'route_prefix'}."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise LmaddaError(f"cannot read Serve config {path}: {error}") from error
    apps = [a for a in (config or {}).get("applications", []) if a.get("import_path") == "lmadda_serve.app:build_app"]
    if len(apps) != 1:
        raise LmaddaError(f"{path} must hold exactly one application with import_path lmadda_serve.app:build_app")
    app = apps[0]
    deployments = [d for d in app.get("deployments", []) if d.get("name") == "StainService"]
    deployment = {k: v for k, v in (deployments[0] if deployments else {}).items() if k != "name"}
    return {"args": dict(app.get("args") or {}), "deployment": deployment, "http_options": config.get("http_options", {}),
            "controller_options": config.get("controller_options") or {}, "name": app.get("name", "lmadda"),
            "route_prefix": app.get("route_prefix", "/")}


def controller_options(config: dict, args: dict) -> dict:
    """The config's controller options, with the proxies' guard (serve/proxy.py) installed and its body
    limits equal to the application's `max_body_mb` and `body_timeout_s` (overrides included)."""
    from lmadda_serve.app import BODY_TIMEOUT_S, MAX_BODY_MB
    from lmadda_serve.proxy import proxy_env

    runtime_env = dict(config["controller_options"].get("runtime_env") or {})
    guard = proxy_env(args.get("max_body_mb", MAX_BODY_MB), args.get("body_timeout_s", BODY_TIMEOUT_S))
    runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **guard}
    return {**config["controller_options"], "runtime_env": runtime_env}


def with_launcher_token(args: dict, host: str, environ: Mapping[str, str]) -> dict:
    """`args` plus the digest of this shell's token, so that it reaches every replica wherever Ray
    places it (a replica reads its node's environment, not this shell's); LmaddaError, before Ray
    starts, for a non-loopback address without a token unless the config allows it."""
    from lmadda_serve.auth import resolve_auth, token_digest

    token_env = args.get("token_env", "LMADDA_SERVE_TOKEN")
    token = environ.get(token_env, "").strip()
    if token and not args.get("token_sha256"):
        args = {**args, "token_sha256": token_digest(token)}
    resolve_auth(host=host, token_env=token_env, environ=environ, token_sha256=args.get("token_sha256"),
                 allow_unauthenticated=args.get("allow_unauthenticated", False))
    return args


def start_local(config_path: Path = DEFAULT_CONFIG, *, host: str | None = None, port: int | None = None,
                deployment: dict | None = None, **overrides) -> str:
    """Start Serve with the config's application (args overridden by `overrides`, deployment options
    by `deployment`); return its URL."""
    from ray import serve

    from lmadda_serve.app import application, check_args, default_tracking_uri

    config = read_serve_config(config_path)
    host = host or config["http_options"].get("host", "127.0.0.1")
    port = port or int(config["http_options"].get("port", 8000))
    try:
        args = check_args({**config["args"], **{k: v for k, v in overrides.items() if v is not None}})
    except ValueError as error:
        raise LmaddaError(f"{config_path}: {error}") from error
    args = with_launcher_token(args, host, os.environ)
    if not args.get("tracking_uri"):
        default_tracking_uri()  # no registry named anywhere: say so here, not in every replica's log
    timeout = config["http_options"].get("request_timeout_s")
    # Options of a Serve instance already running are kept (Serve warns); the replicas' own limits hold either way.
    serve.start(http_options={"host": host, "port": port, **({"request_timeout_s": timeout} if timeout else {})},
                controller_options=controller_options(config, args))
    serve.run(application(args, {**config["deployment"], **(deployment or {})}), name=config["name"], route_prefix=config["route_prefix"])
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"


def serve_until_stopped(config_path: Path = DEFAULT_CONFIG, *, host: str | None = None, port: int | None = None,
                        tracking_uri: str | None = None, num_cpus: int | None = None,
                        then: Callable[[str], int] | None = None) -> int:
    """`lmadda serve`: start a local Ray instance (unless this process is connected to one) and the endpoint, then run
    `then(url)` and return its exit code, or, without `then`, serve until Ctrl-C or SIGTERM. Serve, and Ray if it was
    started here, are shut down however it ends."""
    import ray
    from ray import serve

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=num_cpus, log_to_driver=False)
    stop_on_sigterm()  # after ray.init, which installs its own SIGTERM handler
    try:
        url = start_local(config_path, host=host, port=port, tracking_uri=tracking_uri)
        print(f"[serve] endpoint at {url}  (POST {url}/v1/stain, GET {url}/v1/models, docs at {url}/docs)")
        if then is not None:
            return then(url)
        print("[serve] Ctrl-C or SIGTERM stops it")
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        if started_ray:  # not left to atexit: the local instance's agents go with it, whatever stopped us
            ray.shutdown()


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
