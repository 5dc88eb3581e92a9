"""Who may call the /v1 routes: a bearer token that cannot silently be off (no Ray here, testable alone).

The token reaches a replica in one of two ways:
- `token_sha256` in the application args: the SHA-256 hex digest of the token. A digest cannot be
  sent as a token, so it may sit in a config file, in Serve's stored config and in the dashboard;
  `lmadda serve` passes the digest of its own shell's token this way, so every replica gets it
  wherever Ray places it.
- the environment variable named by `token_env` in the replica's own environment: on KubeRay the
  pod environment (a Secret); on a `ray start` cluster the environment of `ray start` on each node,
  *not* the shell that ran `serve run`.
Without either, a replica behind a non-loopback address refuses to start unless the config says
`allow_unauthenticated: true`, so a forgotten variable is a failed deployment, not an open door.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from lmadda.errors import LmaddaError

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
    if is_loopback(host):
        return Auth(None, f"${token_env} is not set; the address {host} is loopback, reachable from this machine only")
    if allow_unauthenticated:
        return Auth(None, f"${token_env} is not set and the config says allow_unauthenticated: true")
    raise LmaddaError(
        f"refusing to serve on {host} without a token: ${token_env} is not set in this replica's environment and the "
        f"application args have no token_sha256. Set one of: token_sha256 (the SHA-256 of the token) in the config's args; "
        f"${token_env} in the environment of `ray start` on every node (the shell that ran `serve run` does not reach the "
        f"replicas); or bind 127.0.0.1. To serve without auth on purpose, set allow_unauthenticated: true")
