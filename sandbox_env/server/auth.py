"""Who is calling: the server's tokens, the tenant each one names, and where a request carries it.

The admin token comes from `SANDBOX_ENV_TOKEN` (`Settings.token`), `token_file`, or is generated
at start (as Jupyter does); more tenants come from `tenants` / `tenants_file`. A request may carry
its token as `Authorization: Bearer <token>` (also `token <token>`, or HTTP Basic with the token as
password, which is what `http://user:<token>@host` URLs send), as `?token=<token>`, or as the
HttpOnly cookie the page gets after opening `/web?token=<token>`. uvicorn logs request paths with
their query, so `install_log_redaction` rewrites every `token=<value>` in its access and WebSocket
lines to `token=[redacted]`.

Lookups hash the presented token and compare it with every known token's hash in constant time,
so neither timing nor an early exit tells which tenant, if any, came close. Imports only the
standard library and settings.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from sandbox_env.errors import ConfigError

if TYPE_CHECKING:
    from sandbox_env.settings import Settings

COOKIE_NAME = "sandbox_env_token"
ADMIN = "admin"
_DIGEST = 32


@dataclass(frozen=True, slots=True)
class Tenant:
    """A caller: every token names one; the admin sees and may close every tenant's episodes."""

    name: str
    admin: bool = False

    def may_touch(self, owner: str) -> bool:
        return self.admin or owner == self.name


ANONYMOUS = Tenant("anonymous", admin=True)  # auth turned off: one caller, who sees everything
NOBODY = Tenant("", admin=False)  # no tenant recorded (a public probe): owns nothing


def _digest(value: str, key: bytes) -> bytes:
    return hashlib.blake2b(value.encode("utf-8", "surrogatepass"), key=key, digest_size=_DIGEST).digest()


class TokenTable:
    """Token -> tenant, and the derived cookie value -> tenant."""

    def __init__(self, tokens: dict[str, str], *, cookie_key: bytes | None = None) -> None:
        """`tokens` maps tenant name -> token; the name `admin` is the admin. `cookie_key`: the
        key of the page's cookies, new at each start unless given (a farm's replicas share one)."""
        if not tokens:
            raise ConfigError("authentication is on but no token is configured")
        seen: set[str] = set()
        for name, token in tokens.items():
            if len(token) < 16:
                raise ConfigError(f"the token of tenant {name!r} is shorter than 16 characters")
            if token in seen:
                raise ConfigError(f"tenant {name!r} shares its token with another tenant")
            seen.add(token)
        self._key = secrets.token_bytes(32)  # per start: hashes (and cookies) mean nothing elsewhere
        self._cookie_key = cookie_key or secrets.token_bytes(32)
        self._entries = [(_digest(token, self._key), _digest(token, self._cookie_key).hex(),
                          Tenant(name, admin=name == ADMIN)) for name, token in tokens.items()]

    @property
    def tenants(self) -> list[Tenant]:
        return [tenant for _, _, tenant in self._entries]

    def lookup(self, token: str) -> Tenant | None:
        """The tenant of `token`, or None; every entry is compared, whatever matches."""
        presented = _digest(token, self._key)
        found: Tenant | None = None
        for digest, _, tenant in self._entries:
            if hmac.compare_digest(digest, presented):
                found = tenant
        return found

    def lookup_cookie(self, value: str) -> Tenant | None:
        found: Tenant | None = None
        presented = value.encode("ascii", "replace")
        for _, cookie, tenant in self._entries:
            if hmac.compare_digest(cookie.encode(), presented):
                found = tenant
        return found

    def cookie_for(self, token: str) -> str:
        """The cookie value standing for `token` (a keyed hash: the token itself never sits in it)."""
        return _digest(token, self._cookie_key).hex()


def admin_token(settings: Settings) -> tuple[str, bool]:
    """The admin token and whether it was generated here (then the caller should print it)."""
    if settings.token is not None and settings.token.get_secret_value():
        return settings.token.get_secret_value().strip(), False
    if settings.token_file:
        try:
            token = Path(settings.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read token_file {settings.token_file}: {exc}") from exc
        if not token:
            raise ConfigError(f"token_file {settings.token_file} is empty")
        return token, False
    return secrets.token_hex(24), True


def tenant_tokens(settings: Settings) -> dict[str, str]:
    """Tenant name -> token from `tenants` and `tenants_file` (JSON object or `name token` lines)."""
    tokens = {name: secret.get_secret_value() for name, secret in settings.tenants.items()}
    if settings.tenants_file:
        path = Path(settings.tenants_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read tenants_file {path}: {exc}") from exc
        tokens.update(_parse_tenants(text, str(path)))
    if ADMIN in tokens:
        raise ConfigError(f"the tenant name {ADMIN!r} is reserved for the admin token")
    return tokens


def _parse_tenants(text: str, where: str) -> dict[str, str]:
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{where}: not valid JSON: {exc}") from exc
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise ConfigError(f"{where}: expected an object of tenant name -> token strings")
        return dict(data)
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, token = line.replace(":", " ", 1).partition(" ")
        if not name or not token.strip():
            raise ConfigError(f"{where}:{number}: expected 'name token'")
        tokens[name] = token.strip()
    return tokens


def build_table(settings: Settings, admin: str) -> TokenTable:
    # A farm's gateway sends a page's requests to any replica: all must take its cookie, so
    # the cookie key comes from the admin token they share (a keyed hash: the token stays unknown).
    shared = _digest("sandbox-env farm cookie key", admin.encode()[:64]) if settings.farm_peers else None
    return TokenTable({ADMIN: admin, **tenant_tokens(settings)}, cookie_key=shared)


@dataclass(frozen=True, slots=True)
class Credential:
    """A token as presented, and where: `header`, `query` or `cookie`."""

    value: str
    source: str


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def from_authorization(value: str) -> str | None:
    scheme, _, rest = value.strip().partition(" ")
    scheme, rest = scheme.lower(), rest.strip()
    if scheme in ("bearer", "token") and rest:
        return rest
    if scheme == "basic" and rest:
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    return None


def credential(scope: dict[str, object]) -> Credential | None:
    """The token a request carries: the Authorization header first, then `?token=`, then the cookie."""
    headers = scope.get("headers") or []
    assert isinstance(headers, list)
    auth = _header(headers, b"authorization")
    if auth is not None:
        token = from_authorization(auth)
        return Credential(token, "header") if token else None
    query = scope.get("query_string") or b""
    assert isinstance(query, bytes)
    if b"token=" in query:
        for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if key == "token" and value:
                return Credential(value, "query")
    cookies = _header(headers, b"cookie")
    if cookies and COOKIE_NAME in cookies:
        for part in cookies.split(";"):
            key, _, value = part.strip().partition("=")
            if key == COOKIE_NAME and value:
                return Credential(value, "cookie")
    return None


_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&\s\"]+")
REDACTED = "[redacted]"
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
# uvicorn's access lines ("uvicorn.access") and its WebSocket handshake lines ("uvicorn.error")
# carry the request path with its query string.
REDACTED_LOGGERS = ("uvicorn.access", "uvicorn.error")


def redact_tokens(text: str) -> str:
    """`text` with the value of every `token=` query parameter replaced by `[redacted]`."""
    return _TOKEN_IN_QUERY.sub(rf"\g<1>{REDACTED}", text) if "token=" in text else text


class RedactTokens(logging.Filter):
    """Rewrites a record's message and string arguments in place (each argument on its own, so
    uvicorn's access formatter still finds its five)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_tokens(record.msg)
        args = record.args
        if (isinstance(args, tuple) and len(args) == 2 and isinstance(args[0], str)
                and args[0].lower() in SECRET_HEADERS):  # websockets' debug lines: "< %s: %s", name, value
            record.args = (args[0], REDACTED)
        elif isinstance(record.args, tuple):
            record.args = tuple(redact_tokens(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact_tokens(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def install_log_redaction() -> None:
    """Put `RedactTokens` on uvicorn's loggers (once). Filters on a logger survive uvicorn's own
    `dictConfig` and a `--log-config`, which only add to them."""
    for name in REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
