"""The gate every HTTP request and WebSocket handshake passes before any route runs.

In order: the `Host` must name this server (DNS rebinding), a browser's `Origin` must be this
server's own on `/ws` and on state-changing HTTP (cross-site requests), the caller must present a
token (see `auth`), and a POST body must be `application/json` (a cross-site form or `text/plain`
fetch never is). The health probes (`/health`, `/healthz`, `/readyz`) are the only routes outside
it: load balancers, `AutoEnv` and orchestrators call them without credentials, and they reveal
nothing but "up" and "ready" (a probe from an allowed Host with a valid token carries its
tenant, so `/readyz` can add the counts for the admin). There is no CORS: no response ever carries
`Access-Control-Allow-*`, so a page from elsewhere can neither send credentials nor read replies.
`?token=` is traded for the page's cookie only on a navigation the user made (no
`Sec-Fetch-Site`, or `none` or `same-origin`): a link on another site cannot log the browser in
as someone else.

A request that passes carries its `Tenant` in `scope["state"]["tenant"]`. Building the Guard also
installs the redaction of `token=` values from uvicorn's log lines (`auth.install_log_redaction`).
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode, urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from sandbox_env.server.auth import (
    ANONYMOUS,
    COOKIE_NAME,
    NOBODY,
    Credential,
    Tenant,
    TokenTable,
    credential,
    install_log_redaction,
)

PROBES = frozenset({"/health", "/healthz", "/readyz"})
# Pages a browser opens with `?token=`: they get the cookie and a redirect that drops the token
# from the address bar.
PAGES = ("/web", "/docs", "/redoc")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# `Sec-Fetch-Site` values of a navigation the user made (typed, pasted, bookmarked) or one from this
# server's own pages; absent: not a browser that sends it.
USER_NAVIGATION = frozenset({b"", b"none", b"same-origin"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})
WS_POLICY_VIOLATION = 1008


def tenant_of(scope: Any) -> Tenant:
    """The caller of a request or WebSocket (a Starlette `Request`/`WebSocket` or a raw scope)."""
    raw = getattr(scope, "scope", scope)
    tenant = (raw.get("state") or {}).get("tenant")
    return tenant if isinstance(tenant, Tenant) else NOBODY


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """`Host` header value -> lower-case host name without port, brackets or trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


class HostPolicy:
    """Which `Host` names this server answers to."""

    def __init__(self, bind: str, extra: Iterable[str]) -> None:
        extra = [host_name(h) if h != "*" else "*" for h in extra]
        self.any = "*" in extra
        self.wildcard_bind = bind.strip("[]") in WILDCARDS or bind in WILDCARDS
        self.names = set(extra) | {host_name(bind)}
        if self.wildcard_bind:
            # Bound to every interface: also the machine's own names. IP literals are accepted
            # too, since DNS rebinding needs a name the attacker controls.
            for name in (socket.gethostname(), socket.getfqdn()):
                self.names.add(name.lower().rstrip("."))

    def allows(self, host: str | None) -> bool:
        if self.any or host is None:  # no Host at all: an HTTP/1.0 tool, never a browser
            return True
        name = host_name(host)
        return (name in self.names or _is_loopback(name) or (self.wildcard_bind and _is_ip(name)))


def _headers(scope: Scope) -> dict[bytes, bytes]:
    found: dict[bytes, bytes] = {}
    for key, value in scope.get("headers") or ():
        found.setdefault(key, value)
    return found


def same_origin(origin: str, host: str | None, allowed: frozenset[str]) -> bool:
    """Whether a browser's `Origin` is this server (as addressed by `Host`) or configured."""
    origin = origin.strip().lower()
    if origin in allowed:
        return True
    if origin == "null" or host is None:
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    return parts.netloc == host.strip().lower()


def _media_type(value: bytes | None) -> str:
    return (value or b"").decode("latin-1").split(";", 1)[0].strip().lower()


class Guard:
    """ASGI middleware: Host, Origin, credentials and content type, before any route."""

    def __init__(self, app: ASGIApp, *, hosts: HostPolicy, origins: Iterable[str],
                 tokens: TokenTable | None) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = frozenset(o.strip().lower().rstrip("/") for o in origins)
        self.tokens = tokens
        install_log_redaction()  # uvicorn's log lines carry ?token= of the paths it logs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        method = scope.get("method", "GET") if kind == "http" else "GET"
        headers = _headers(scope)
        host = headers[b"host"].decode("latin-1") if b"host" in headers else None
        if kind == "http" and path in PROBES and method in SAFE_METHODS:
            # Open to anyone; a caller who passes the gate is known (the admin sees /readyz's counts).
            if self.hosts.allows(host) and (tenant := self._tenant(credential(scope))) is not None:
                scope.setdefault("state", {})["tenant"] = tenant
            await self.app(scope, receive, send)
            return
        if not self.hosts.allows(host):
            await self._refuse(scope, receive, send, 403, "host_not_allowed",
                               "this server does not answer to that Host name; add it to allowed_hosts")
            return
        origin = headers.get(b"origin")
        if origin is not None and (kind == "websocket" or method not in SAFE_METHODS):
            if not same_origin(origin.decode("latin-1"), host, self.origins):
                await self._refuse(scope, receive, send, 403, "origin_not_allowed",
                                   "cross-origin requests are refused; add the origin to allowed_origins")
                return
        fetch_site = headers.get(b"sec-fetch-site", b"").lower()
        if fetch_site == b"cross-site" and (kind == "websocket" or method not in SAFE_METHODS):
            await self._refuse(scope, receive, send, 403, "origin_not_allowed",
                               "cross-site requests are refused")
            return
        found = credential(scope)
        tenant = self._tenant(found)
        if tenant is None:
            await self._refuse(scope, receive, send, 401, "unauthorized",
                               "missing or invalid token: send 'Authorization: Bearer <token>' "
                               "(SANDBOX_ENV_TOKEN for sandbox-env's clients)")
            return
        if kind == "http" and method in ("POST", "PUT", "PATCH") and _has_body(headers) \
                and _media_type(headers.get(b"content-type")) != "application/json":
            await self._refuse(scope, receive, send, 415, "unsupported_media_type",
                               "request bodies must be application/json")
            return
        scope.setdefault("state", {})["tenant"] = tenant
        if found is not None and found.source == "query" and kind == "http" and method == "GET" \
                and self.tokens is not None and path.startswith(PAGES):
            if fetch_site not in USER_NAVIGATION:  # a link elsewhere would log the browser in as its author
                await self._refuse(scope, receive, send, 403, "origin_not_allowed",
                                   "a ?token= URL opened from another site is refused: paste the URL "
                                   "into the address bar")
                return
            await self._set_cookie_and_redirect(scope, send, found)
            return
        await self.app(scope, receive, send)

    def _tenant(self, found: Credential | None) -> Tenant | None:
        if self.tokens is None:
            return ANONYMOUS
        if found is None:
            return None
        if found.source == "cookie":
            return self.tokens.lookup_cookie(found.value)
        return self.tokens.lookup(found.value)

    async def _set_cookie_and_redirect(self, scope: Scope, send: Send, found: Credential) -> None:
        assert self.tokens is not None
        from urllib.parse import parse_qsl

        query = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                                                   keep_blank_values=True) if k != "token"]
        location = scope.get("root_path", "") + scope["path"] + (f"?{urlencode(query)}" if query else "")
        cookie = (f"{COOKIE_NAME}={self.tokens.cookie_for(found.value)}; Path=/; HttpOnly; "
                  "SameSite=Strict")
        if scope.get("scheme") == "https":
            cookie += "; Secure"
        await send({"type": "http.response.start", "status": 303, "headers": [
            (b"location", location.encode("latin-1", "replace")), (b"set-cookie", cookie.encode()),
            (b"cache-control", b"no-store"), (b"referrer-policy", b"no-referrer"),
            (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, code: str,
                      message: str) -> None:
        body = json.dumps({"detail": {"message": message, "code": code}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="sandbox-env"'))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if "websocket.http.response" in (scope.get("extensions") or {}):
            await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
            return
        await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION, "reason": code})


def _has_body(headers: dict[bytes, bytes]) -> bool:
    length = headers.get(b"content-length")
    if length is not None:
        return length.strip() not in (b"0", b"")
    return b"transfer-encoding" in headers
