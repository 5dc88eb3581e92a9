"""Who may call the /v1 routes: a bearer token that cannot silently be off (no Ray here, testable alone).

The token reaches a replica in one of two ways:
- `token_sha256` in the application args: the SHA-256 hex digest of the token. A digest cannot be
  sent as a token, so it may sit in a config file, in Serve's stored config and in the dashboard;
  `lmadda serve` passes the digest of its own shell's token this way, so every replica gets it
  wherever Ray places it.
- the environment variable named by `token_env` in the replica's own environment: on KubeRay the
  pod environment (a Secret); on a `ray start` cluster the environment of `ray start` on each node,
  *not* the shell that ran `serve run`.
Without either, a replica refuses to start unless the config says `allow_unauthenticated: true`,
on loopback too (any web page the operator opens can reach loopback), so a forgotten variable is a
failed deployment, not an open door. `lmadda serve` without a token makes one (`launcher_token`):
it is stored in the per-user token file (mode 0600), printed once when made, and read from there by
`lmadda stain`.

Whatever the auth, the Host and Origin headers of /v1 requests are checked (`origin_problem`): a DNS
rebinding page reaches a loopback endpoint under its own host name, and a cross-origin form can
POST to it; both are refused.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from lmadda.core.errors import LmaddaError

SHA256_HEX = 64


def token_digest(token: str) -> str:
    """The SHA-256 hex digest that `token_sha256` holds (also: `printf %s "$TOKEN" | sha256sum`)."""
    return hashlib.sha256(token.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything, so it counts as reachable
        return False


@dataclass(frozen=True)
class Auth:
    """The accepted token's digest (None: no auth) and where it came from, for the start-up log."""

    digest: str | None
    source: str

    def accepts(self, authorization: str) -> bool:
        if self.digest is None:
            return True
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        return hmac.compare_digest(token_digest(token.strip()), self.digest)

    def describe(self, host: str) -> str:
        """One log line: whether auth is on and where the token came from, never the token."""
        if self.digest is None:
            return f"auth OFF on {host}: every /v1 route is open ({self.source})"
        return f"auth ON on {host}: /v1 routes need 'Authorization: Bearer <token>' (token from {self.source})"


def resolve_auth(*, host: str, token_env: str, environ: Mapping[str, str], token_sha256: str | None = None,
                 allow_unauthenticated: bool = False) -> Auth:
    """The replica's auth from its args and environment; LmaddaError when it would be open to the
    network without the config saying so."""
    if token_sha256:
        digest = token_sha256.strip().lower()
        if len(digest) != SHA256_HEX or any(c not in "0123456789abcdef" for c in digest):
            raise LmaddaError(f"token_sha256 {token_sha256[:12]!r}... is not a SHA-256 hex digest (64 hex characters); "
                              f"make it with: printf %s \"$TOKEN\" | sha256sum")
        return Auth(digest, "token_sha256 in the application args")
    token = environ.get(token_env, "").strip()
    if token:
        return Auth(token_digest(token), f"${token_env} in the replica's environment")
    if allow_unauthenticated:
        return Auth(None, f"${token_env} is not set and the config says allow_unauthenticated: true")
    raise LmaddaError(
        f"refusing to serve on {host} without a token: ${token_env} is not set in this replica's environment and the "
        f"application args have no token_sha256. Start it with `lmadda serve`, which makes a token if none is set, or set "
        f"one of: token_sha256 (the SHA-256 of the token) in the config's args; ${token_env} in the environment of `ray "
        f"start` on every node (the shell that ran `serve run` does not reach the replicas). Loopback is no exception: "
        f"any web page you open can reach it. To serve without auth on purpose, set allow_unauthenticated: true")


def token_file() -> Path:
    """Where `lmadda serve` keeps the token it made, and `lmadda stain` looks for one: per user, mode 0600."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "lmadda" / "serve-token"


def stored_token() -> str | None:
    """The token in `token_file()`, if there is one; LmaddaError if others could read or replace it."""
    path = token_file()
    if not path.is_file():
        return None
    info = path.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise LmaddaError(f"token file {path} is not private (owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}): "
                          f"others could read it. Remove it (`rm {path}`) and start `lmadda serve` again to make a new one")
    return path.read_text().strip() or None


def launcher_token() -> tuple[str, bool]:
    """(the stored token, False), or (a new random one, True) after storing it in `token_file()` with mode 0600."""
    token = stored_token()
    if token:
        return token, False
    path = token_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    path.chmod(0o600)
    return token, True


def _host_name(netloc: str) -> str:
    """The host of a Host header or URL netloc, without its port ('[::1]:8000' -> '::1')."""
    return (urlsplit(f"//{netloc}").hostname or "").lower()


def origin_problem(host_header: str | None, origin: str | None, *, bind_host: str,
                   allowed_hosts: Sequence[str] | None = None) -> str | None:
    """Why a /v1 request's Host or Origin is refused (None: accepted).

    Host: one of `allowed_hosts` when given; else, on a loopback bind, a loopback name (a rebinding page
    arrives under its own name); else any (the token guards a reachable address). Origin, sent by browsers:
    absent, the same origin as Host (the endpoint's own /docs page), or one of `allowed_hosts`."""
    allowed = {h.lower() for h in allowed_hosts or ()}
    if host_header:
        name = _host_name(host_header)
        if allowed and name not in allowed and not is_loopback(name):
            return f"Host {host_header!r} is not one this endpoint answers to (allowed_hosts: {', '.join(sorted(allowed))})"
        if not allowed and is_loopback(bind_host) and not is_loopback(name):
            return (f"Host {host_header!r} is not a loopback name, and this endpoint listens on {bind_host} only (a DNS-rebinding "
                    "page would arrive this way); list the names it is reached by in the serve arg allowed_hosts")
    if origin:
        netloc = urlsplit(origin).netloc
        if origin == "null" or not netloc:
            return f"Origin {origin!r} is not a web origin this endpoint accepts"
        if netloc.lower() != (host_header or "").lower() and _host_name(netloc) not in allowed:
            return (f"cross-origin request from {origin} refused; a browser page of another site cannot call this endpoint "
                    "(list its host in the serve arg allowed_hosts to allow it)")
    return None
