"""The endpoint's auth decision (serve/auth.py) and its plumbing through `lmadda serve` (no Ray)."""

import pytest

from lmadda.core.errors import LmaddaError
from lmadda_serve.auth import is_loopback, resolve_auth, token_digest

TOKEN = "a-random-token-0123456789abcdef"


def test_loopback_addresses_are_told_apart_from_reachable_ones():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "node-1.cluster"))


def test_no_token_on_a_reachable_address_is_refused_unless_the_config_says_so():
    with pytest.raises(LmaddaError, match="refusing to serve on 0.0.0.0 without a token"):
        resolve_auth(host="0.0.0.0", token_env="LMADDA_SERVE_TOKEN", environ={})
    allowed = resolve_auth(host="0.0.0.0", token_env="LMADDA_SERVE_TOKEN", environ={}, allow_unauthenticated=True)
    assert allowed.digest is None and "allow_unauthenticated: true" in allowed.describe("0.0.0.0")
    with pytest.raises(LmaddaError, match="Loopback is no exception"):  # auth on by default, loopback included
        resolve_auth(host="127.0.0.1", token_env="LMADDA_SERVE_TOKEN", environ={})
    assert resolve_auth(host="127.0.0.1", token_env="LMADDA_SERVE_TOKEN", environ={}, allow_unauthenticated=True).digest is None


def test_lmadda_serve_makes_a_private_token_once_and_lmadda_stain_reads_it():
    import stat

    from lmadda_serve.auth import launcher_token, stored_token, token_file
    from lmadda_serve.client import token_from_env

    token, created = launcher_token()
    assert created and len(token) >= 40 and stat.S_IMODE(token_file().stat().st_mode) == 0o600
    assert launcher_token() == (token, False)  # kept: clients keep working across restarts
    assert stored_token() == token_from_env("LMADDA_NO_SUCH_VARIABLE") == token
    token_file().chmod(0o644)
    with pytest.raises(LmaddaError, match="is not private .* Remove it"):
        stored_token()


@pytest.mark.parametrize("host, origin, bind, allowed, refused", [
    ("127.0.0.1:8000", None, "127.0.0.1", None, None),
    ("localhost:8000", "http://localhost:8000", "127.0.0.1", None, None),
    ("[::1]:8000", None, "127.0.0.1", None, None),
    (None, None, "127.0.0.1", None, None),  # HTTP/1.0 without Host: no browser sends that
    ("evil.example", None, "127.0.0.1", None, "not a loopback name"),
    ("127.0.0.1:8000", "http://evil.example", "127.0.0.1", None, "cross-origin"),
    ("127.0.0.1:8000", "null", "127.0.0.1", None, "not a web origin"),
    ("node-1.cluster:8000", None, "0.0.0.0", None, None),  # reachable bind: the token guards it
    ("evil.example", None, "0.0.0.0", ["stain.lab"], "not one this endpoint answers to"),
    ("stain.lab", "https://portal.lab", "0.0.0.0", ["stain.lab", "portal.lab"], None),
])
def test_host_and_origin_rules(host, origin, bind, allowed, refused):
    from lmadda_serve.auth import origin_problem

    problem = origin_problem(host, origin, bind_host=bind, allowed_hosts=allowed)
    assert (problem is None) if refused is None else (refused in problem)


def test_the_token_comes_from_the_args_digest_or_the_replica_environment_and_is_checked_exactly():
    from_env = resolve_auth(host="0.0.0.0", token_env="LMADDA_SERVE_TOKEN", environ={"LMADDA_SERVE_TOKEN": TOKEN})
    from_args = resolve_auth(host="0.0.0.0", token_env="LMADDA_SERVE_TOKEN", environ={}, token_sha256=token_digest(TOKEN).upper())
    for auth in (from_env, from_args):
        assert auth.accepts(f"Bearer {TOKEN}") and auth.accepts(f"bearer {TOKEN}")
        assert not any(auth.accepts(h) for h in ("", "Bearer", f"Basic {TOKEN}", f"Bearer {TOKEN}x", TOKEN))
        assert TOKEN not in auth.describe("0.0.0.0") and token_digest(TOKEN) not in auth.describe("0.0.0.0")
    with pytest.raises(LmaddaError, match="not a SHA-256 hex digest"):
        resolve_auth(host="0.0.0.0", token_env="LMADDA_SERVE_TOKEN", environ={}, token_sha256=TOKEN)


def test_lmadda_serve_passes_its_shells_token_to_the_replicas_as_a_digest_and_refuses_an_open_bind(monkeypatch):
    from lmadda_serve.local import start_local, with_launcher_token

    args = with_launcher_token({"token_env": "LMADDA_SERVE_TOKEN"}, "0.0.0.0", {"LMADDA_SERVE_TOKEN": TOKEN})
    assert args["token_sha256"] == token_digest(TOKEN) and TOKEN not in str(args)
    monkeypatch.delenv("LMADDA_SERVE_TOKEN", raising=False)
    with pytest.raises(LmaddaError, match="refusing to serve on 0.0.0.0"):  # before Ray or Serve start
        start_local(host="0.0.0.0", port=1)


def test_a_quoted_boolean_in_the_config_is_refused():
    from lmadda_serve.app import check_args

    with pytest.raises(ValueError, match="allow_unauthenticated is 'false'; write true or false without quotes"):
        check_args({"allow_unauthenticated": "false"})
