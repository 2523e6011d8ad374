"""HTTP hardening in front of the whole app (JSON API, metrics and the mounted Gradio UI alike), and the text and
credential checks the routes share.

`install(app, settings)` adds one ASGI middleware, outermost of the app's own middleware, that for every request:

1. checks the Host header against an allow-list (loopback names always, the bound --host when it is a specific
   address, and --allowed-hosts): DNS rebinding gets 400 before anything else runs. /healthz and /readyz are
   exempt, so probes that use an IP address as Host keep working; they reveal nothing private;
2. refuses state-changing requests (POST, PUT, PATCH, DELETE, and WebSocket handshakes) whose Origin is not this
   site (cross-site request forgery, including login CSRF and uploads), and removes every CORS header from every
   response: the UI is same-origin, and no other origin is meant to read anything here;
3. limits request bodies while they are read: Content-Length over the route's limit gets 413 before the app sees
   the request, and a body without one (chunked) is counted and cut off with 413 at the limit;
4. answers the JSON API's POST with 415 unless its Content-Type is application/json (a browser "simple request",
   text/plain, would otherwise drive it from any web page);
5. throttles repeated failed logins per client address: Gradio's POST /login here, the JSON API and /metrics through
   `check_api_credentials`, all in one `LoginThrottle`;
6. refuses Gradio file URLs that point into the outputs folder (the UI is served Gradio's own copies of the images;
   the folder itself, history.jsonl included, is never served), whatever Gradio's allowed paths say. The outputs
   folder is not in `allowed_paths` either (server.py): Gradio 6 copies files that event handlers return (History
   gallery, PNG downloads) into its cache without consulting allowed paths for a mounted app (`has_launched` is
   never set), and serves those copies; tests/test_security.py checks the History images still load.

This module imports only the standard library (and units.py), so request validation can use `clean_prompt`
without web dependencies.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import threading
import time
import unicodedata
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlsplit

from .units import MIB

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("zimage.security")

# ---- limits: the one place they are set ----------------------------------------------------------------------
BODY_LIMIT = 1 * MIB  # every route not listed below: the JSON API (a prompt is <= 16 Ki characters), Gradio's JSON
UPLOAD_FILE_LIMIT = 50 * MIB  # Gradio's max_file_size: the PNG dropped on "Read PNG parameters" (ours are < 10 MiB)
BODY_LIMITS = {  # exact paths (a trailing slash ignored) -> bytes
    "/gradio_api/upload": UPLOAD_FILE_LIMIT + 1 * MIB,  # multipart: the file plus its part headers
    "/v1/images/edits": 41 * MIB,  # multipart: image and mask of at most 20 MiB each (request.MAX_INPUT_BYTES)
}
DRAIN_LIMIT = 8 * MIB  # a too-large body up to this size is read and discarded before the 413 (see _refuse_early)
DRAIN_SECONDS = 5.0
LOGIN_MAX_FAILURES = 10  # failed logins per client address ...
LOGIN_WINDOW_SECONDS = 60.0  # ... within this many seconds; then 429 until the oldest failure is that old
LOGIN_TRACKED_ADDRESSES = 10_000  # memory bound for the throttle's table

JSON_API_PATH = "/v1/images/generations"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
HOST_EXEMPT_PATHS = ("/healthz", "/readyz")
GRADIO_FILE_PREFIXES = ("/gradio_api/file=", "/gradio_api/file/")
LOGIN_PATH = "/login"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
STATE_KEY = "zimage_security"


# ---- Host names -----------------------------------------------------------------------------------------------
def split_host(value: str) -> tuple[str, int | None] | None:
    """'Name:port', '[v6]:port', 'name' -> (lower-case name or normalised IP, port or None); None if malformed."""
    value = value.strip().lower()
    if not value or any(c in value for c in " \t/\\@?#%,;\"'<>`{}|^") or not value.isascii():
        return None
    port: str | None = None
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
        try:
            name = ipaddress.IPv6Address(name).compressed
        except ValueError:
            return None
    elif value.count(":") > 1:  # a bare IPv6 address (allowed in settings, never valid in a Host header)
        try:
            name = ipaddress.IPv6Address(value).compressed
        except ValueError:
            return None
    else:
        name, sep, port_text = value.partition(":")
        port = port_text if sep else None
        name = name.rstrip(".")
        if not name:
            return None
    if port is not None:
        if not port.isdigit() or not 0 < int(port) < 65536:
            return None
        return name, int(port)
    return name, None


def parse_allowed_hosts(raw: str) -> tuple[str, ...]:
    """The --allowed-hosts value: comma-separated names, 'name:port', IPs, '[v6]', or '*' alone (no check)."""
    entries = tuple(e.strip().lower() for e in raw.split(",") if e.strip())
    if "*" in entries:
        if len(entries) > 1:
            raise ValueError("'*' (accept any Host) must be given alone")
        return entries
    for entry in entries:
        if split_host(entry) is None:
            raise ValueError(f"{entry!r} is not a host name, 'name:port', an IP address or '[IPv6]'")
    return entries


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, 'localhost')."""
    host = host.strip().strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_unspecified
    except ValueError:
        return False


class HostList:
    """Which Host headers this server answers to."""

    def __init__(self, entries: tuple[str, ...] | list[str]):
        self.any = "*" in entries
        self.entries: set[tuple[str, int | None]] = set()
        for entry in entries:
            parsed = split_host(entry) if entry != "*" else None
            if parsed is not None:
                self.entries.add(parsed)
        names = {"[" + n + "]" if ":" in n else n for n, _ in self.entries}
        self.names = sorted(names | ({"*"} if self.any else set()))

    @classmethod
    def for_settings(cls, settings: "Settings") -> "HostList":
        entries = list(LOOPBACK_HOSTS) + list(settings.allowed_hosts)
        if not is_unspecified(settings.host):  # a specific address (or name) to bind: clients will use it
            entries.append(settings.host)
        return cls(tuple(entries))

    def allows(self, host_header: str | None) -> bool:
        if self.any:
            return True
        parsed = split_host(host_header) if host_header else None
        if parsed is None:
            return False
        name, port = parsed
        return (name, None) in self.entries or (port is not None and (name, port) in self.entries)


def same_origin(origin: str, host_header: str | None, forwarded_host: str | None = None) -> bool:
    """Is the Origin header this site? Compared with Host (and X-Forwarded-Host, set by a proxy that rewrites Host;
    a cross-site page cannot add that header without a CORS preflight, and preflights never succeed here)."""
    try:
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        origin_name = parts.hostname.rstrip(".")
        origin_port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    if ":" in origin_name:
        try:
            origin_name = ipaddress.IPv6Address(origin_name).compressed
        except ValueError:
            return False
    for candidate in (host_header, forwarded_host.split(",")[0] if forwarded_host else None):
        parsed = split_host(candidate) if candidate else None
        if parsed is None:
            continue
        name, port = parsed
        if name == origin_name and (port is None or port == origin_port):
            return True
    return False


# ---- credentials --------------------------------------------------------------------------------------------
def _equal(candidate: bytes, secret: str) -> bool:
    """Constant-time comparison of the bytes a client sent with a configured secret. The secret is taken as UTF-8
    (RFC 7617) and, when it can be, as ISO-8859-1, which Python's http.client and requests send for str headers."""
    digest = hashlib.sha256(candidate).digest()  # equal-length inputs: no timing signal about the length either
    ok = hmac.compare_digest(digest, hashlib.sha256(secret.encode("utf-8")).digest())
    try:
        latin = secret.encode("latin-1")
    except UnicodeEncodeError:
        latin = secret.encode("utf-8")
    return ok | hmac.compare_digest(digest, hashlib.sha256(latin).digest())


def credentials_match(authorization: bytes, user: str, password: str) -> bool:
    """An Authorization header (raw bytes) against user:password: 'Basic base64(user:password)' or 'Bearer
    password'. Any Unicode; malformed headers (bad base64, no colon, any bytes at all) are simply False."""
    scheme, _, value = authorization.strip().partition(b" ")
    value = value.strip()
    if scheme.lower() == b"bearer":
        return bool(value) and _equal(value, password)
    if scheme.lower() == b"basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return False
        given_user, sep, given_password = decoded.partition(b":")
        return bool(sep) & _equal(given_user, user) & _equal(given_password, password)
    return False


class LoginThrottle:
    """Failed logins per client address in a sliding window; after `max_failures` within `window` seconds that
    address gets 429 (every attempt, right or wrong, so a guess cannot tell) until the oldest failure ages out."""

    def __init__(self, max_failures: int = LOGIN_MAX_FAILURES, window: float = LOGIN_WINDOW_SECONDS,
                 max_addresses: int = LOGIN_TRACKED_ADDRESSES, clock: Callable[[], float] = time.monotonic):
        self.max_failures, self.window, self.max_addresses, self.clock = max_failures, window, max_addresses, clock
        self._failures: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> collections.deque | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def retry_after(self, address: str) -> int | None:
        """Seconds until `address` may try again, or None if it may now."""
        with self._lock:
            now = self.clock()
            times = self._recent(address, now)
            if times is None or len(times) < self.max_failures:
                return None
            return max(1, math.ceil(times[-self.max_failures] + self.window - now))

    def failed(self, address: str) -> None:
        with self._lock:
            now = self.clock()
            times = self._recent(address, now)
            if times is None:
                times = self._failures[address] = collections.deque(maxlen=self.max_failures)
                while len(self._failures) > self.max_addresses:
                    self._failures.popitem(last=False)
            else:
                self._failures.move_to_end(address)
            times.append(now)


class AuthFailure:
    """What the JSON API answers when credentials are refused (api.py turns it into its error shape)."""

    def __init__(self, status: int, message: str, type_: str, code: str | None, headers: dict[str, str]):
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def client_address(scope: dict) -> str:
    """The peer address; uvicorn replaces it with X-Forwarded-For's when the peer is a proxy it trusts (environment
    FORWARDED_ALLOW_IPS, default 127.0.0.1,::1), so behind a local reverse proxy each client is throttled alone."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def check_api_credentials(request: Any, auth: tuple[str, str] | None) -> AuthFailure | None:
    """None when the request may proceed; otherwise 401 (wrong or missing credentials) or 429 (too many failures
    from this address). `request` is a Starlette Request of an app `install`ed here (else there is no throttle)."""
    if auth is None:
        return None
    guard = getattr(getattr(request.app, "state", None), STATE_KEY, None)
    address = client_address(request.scope)
    if guard is not None:
        wait = guard.throttle.retry_after(address)
        if wait is not None:
            return AuthFailure(429, f"too many failed logins from {address}; try again in {wait} s",
                               "authentication_error", "login_throttled", {"Retry-After": str(wait)})
    header = b""
    for name, value in request.scope.get("headers", ()):
        if name == b"authorization":
            header = value
            break
    if credentials_match(header, *auth):
        return None
    if header and guard is not None:
        guard.throttle.failed(address)
    return AuthFailure(401, "missing or wrong credentials: send HTTP Basic user:password, or 'Authorization: "
                       "Bearer <password>'", "authentication_error", None,
                       {"WWW-Authenticate": 'Basic realm="zimage", charset="UTF-8"'})


# ---- prompts ----------------------------------------------------------------------------------------------
class UnsafeText(ValueError):
    """Text that cannot be tokenized or stored (a lone UTF-16 surrogate); the message says where."""


KEPT_CONTROLS = frozenset("\n\t\u200c\u200d")  # line breaks, tabs, ZWNJ/ZWJ (Persian, Indic scripts, emoji)


def clean_prompt(text: str) -> tuple[str, str | None]:
    """(text without control and invisible format characters, a warning naming what was removed, or None).

    Removed: every Cc character (C0 including NUL and CR, DEL, C1 such as U+0085 and U+009B) except tab and
    newline, and every Cf character (bidi overrides and isolates, zero-width space, BOM, soft hyphen, tag
    characters) except ZWNJ and ZWJ. CRLF becomes LF first, silently. Raises UnsafeText for lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnsafeText(f"prompt contains a lone surrogate (U+{ord(text[exc.start]):04X} at character "
                         f"{exc.start + 1}), which is not text: send valid Unicode (a UTF-16 surrogate must "
                         "come in a high+low pair)") from None
    text = text.replace("\r\n", "\n")
    if text.isprintable():
        return text, None
    kept: list[str] = []
    removed: list[str] = []
    for ch in text:
        if ch not in KEPT_CONTROLS and unicodedata.category(ch) in ("Cc", "Cf"):
            removed.append(ch)
        else:
            kept.append(ch)
    if not removed:
        return text, None
    names = sorted({f"U+{ord(ch):04X}" for ch in removed})
    listed = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return "".join(kept), (f"control characters ({listed}; {len(removed)} in all) were removed from the prompt")


# ---- the middleware -----------------------------------------------------------------------------------------
class _BodyTooLarge(Exception):
    pass


class Guard:
    """The per-app state the middleware and the routes share."""

    def __init__(self, settings: "Settings", outputs: str | os.PathLike | None = None):
        self.hosts = HostList.for_settings(settings)
        self.throttle = LoginThrottle()
        self.outputs = os.path.realpath(outputs if outputs is not None else settings.outputs)
        self._seen_bad_hosts: set[str] = set()

    def note_bad_host(self, host: str | None) -> None:
        """Log each refused Host once (bounded), naming the setting that would allow it."""
        key = (host or "")[:200]
        if key in self._seen_bad_hosts or len(self._seen_bad_hosts) >= 100:
            return
        self._seen_bad_hosts.add(key)
        log.warning("refused Host %r (allowed: %s); add it to --allowed-hosts / ZIMAGE_ALLOWED_HOSTS if it is yours",
                    key, ", ".join(self.hosts.names))

    def serves_file(self, path: str) -> bool:
        """False for Gradio file URLs that point into the outputs folder (longest matching root wins, so Gradio's
        own cache is served even when it lies inside the outputs folder, and outputs inside the cache are not)."""
        if "://" in path[:12]:
            return True  # a URL, not a file: Gradio's own rules apply
        try:
            from gradio import utils as gradio_utils

            cache = os.path.realpath(gradio_utils.get_upload_folder())
        except Exception:  # noqa: BLE001 - without Gradio there is nothing else to serve
            cache = None
        target = os.path.realpath(os.path.abspath(path))

        def depth(root: str | None) -> int:
            if root is None:
                return -1
            if target == root or target.startswith(root.rstrip(os.sep) + os.sep):
                return len(root)
            return -1

        return depth(self.outputs) < 0 or depth(cache) > depth(self.outputs)


def body_limit(path: str) -> int:
    return BODY_LIMITS.get(path.rstrip("/") or "/", BODY_LIMIT)


class SecurityMiddleware:
    """Raw ASGI (no buffering, no Starlette request objects): see the module docstring for what it does."""

    def __init__(self, app, guard: Guard):
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        path = scope.get("path", "")
        method = scope.get("method", "GET") if kind == "http" else "WEBSOCKET"
        host = headers.get("host")
        small = declared_small(headers.get("content-length"))  # refusals read (and drop) small bodies first

        if not self.guard.hosts.allows(host) and not (method in ("GET", "HEAD") and path in HOST_EXEMPT_PATHS):
            self.guard.note_bad_host(host)
            await _reject(scope, receive, send, 400, f"Host {(host or '')[:100]!r} is not served here: this server "
                          "answers only to the names in its --allowed-hosts / ZIMAGE_ALLOWED_HOSTS setting (and "
                          "loopback)", "invalid_host", drain=small)
            return
        origin = headers.get("origin")
        if origin is not None and method not in SAFE_METHODS and not same_origin(
                origin, host, headers.get("x-forwarded-host")):
            await _reject(scope, receive, send, 403, f"cross-origin {method} refused: Origin {origin[:100]!r} is "
                          "not this site", "cross_origin", drain=small)
            return
        if kind == "websocket":
            await self.app(scope, receive, send)
            return

        limit = body_limit(path)
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > limit:
                await _reject(scope, receive, send, 413, f"request body is {declared} bytes; the limit for {path} "
                              f"is {limit}", "request_too_large", drain=declared <= DRAIN_LIMIT)
                return
        if method == "POST" and path.rstrip("/") == JSON_API_PATH:
            media_type = (headers.get("content-type") or "").split(";")[0].strip().lower()
            if media_type != "application/json":
                await _reject(scope, receive, send, 415, f"Content-Type must be application/json (got "
                              f"{(headers.get('content-type') or 'none')[:100]!r}); send the body as JSON with "
                              "'Content-Type: application/json'", "unsupported_media_type", drain=small)
                return
        if method in ("GET", "HEAD") and path.startswith(GRADIO_FILE_PREFIXES):
            file_path = path.split("=", 1)[1] if path.startswith(GRADIO_FILE_PREFIXES[0]) else path[len(
                GRADIO_FILE_PREFIXES[1]):]
            if not self.guard.serves_file(file_path):
                await _reject(scope, receive, send, 403, "File not allowed: the outputs folder is not served",
                              "forbidden", drain=False)
                return
        login = method == "POST" and path.rstrip("/") == LOGIN_PATH
        address = client_address(scope)
        if login:
            wait = self.guard.throttle.retry_after(address)
            if wait is not None:
                await _reject(scope, receive, send, 429, f"too many failed logins from {address}; try again in "
                              f"{wait} s", "login_throttled", drain=small,
                              headers=[(b"retry-after", str(wait).encode())])
                return

        state = {"received": 0, "too_large": False, "started": False, "refused": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["too_large"] = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                if state["too_large"]:
                    return await refuse()
                state["started"] = True
                if login and message.get("status") in (400, 401):
                    self.guard.throttle.failed(address)
                message = {**message, "headers": [(k, v) for k, v in message.get("headers", [])
                                                  if not k.lower().startswith(b"access-control-")]}
            elif state["refused"]:
                return  # the app's own answer to a body we cut off: ours went out instead
            await send(message)

        async def refuse():
            if not state["refused"] and not state["started"]:
                state["refused"] = True
                await _answer(scope, receive, send, 413, f"request body is larger than the limit for {path} "
                              f"({limit} bytes)", "request_too_large", drain=True)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            await refuse()
            return
        except Exception:
            if state["too_large"]:  # the app turned our cut-off into its own error: answer 413 instead
                await refuse()
                return
            raise
        if state["too_large"]:
            await refuse()


def declared_small(length: str | None) -> bool:
    return length is not None and length.isdigit() and int(length) <= DRAIN_LIMIT


def _headers(scope) -> dict[str, str]:
    """Header name -> first value (latin-1, as HTTP carries them); enough for Host, Origin, Content-*."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        key = name.decode("latin-1").lower()
        if key not in out:
            out[key] = value.decode("latin-1")
    return out


async def _reject(scope, receive, send, status: int, message: str, code: str, *, drain: bool,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    await _answer(scope, receive, send, status, message, code, drain=drain, headers=headers)


async def _answer(scope, receive, send, status: int, message: str, code: str, *, drain: bool,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send the whole error at once; with `drain`, keep the response open while reading and discarding what is
    left of the body (up to DRAIN_LIMIT bytes, DRAIN_SECONDS), then end it. A client that sends its whole body
    before reading (urllib, fetch) would otherwise meet a connection closed with unread data, a TCP reset, and see
    'connection reset' instead of the 413. Nothing is kept: memory does not grow."""
    if drain and any(k == b"expect" and v.lower() == b"100-continue" for k, v in scope.get("headers", ())):
        drain = False  # the client waits for "100 Continue" before sending the body: nothing is in flight
    await _send_error(send, scope, status, message, code, headers, more_body=drain)
    if not drain:
        return
    deadline, read = time.monotonic() + DRAIN_SECONDS, 0
    while read <= DRAIN_LIMIT:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            message_in = await asyncio.wait_for(receive(), remaining)
        except (asyncio.TimeoutError, _BodyTooLarge):
            break
        if message_in["type"] != "http.request" or not message_in.get("more_body", False):
            break
        read += len(message_in.get("body", b""))
    await send({"type": "http.response.body", "body": b""})


async def _send_error(send, scope, status: int, message: str, code: str,
                      headers: list[tuple[bytes, bytes]] | None = None, more_body: bool = False) -> None:
    """The JSON API's error shape under /v1/, plain text elsewhere (Gradio's routes, the UI, /metrics)."""
    if scope.get("path", "").startswith("/v1/"):
        type_ = {413: "invalid_request_error", 415: "invalid_request_error", 429: "authentication_error",
                 403: "invalid_request_error"}.get(status, "invalid_request_error")
        body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
        content_type = b"application/json"
    else:
        body = (message + "\n").encode()
        content_type = b"text/plain; charset=utf-8"
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type), (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body, "more_body": more_body})


def install(app, settings: "Settings") -> Guard:
    """Put the middleware in front of `app` (call before it starts) and make the guard reachable from routes."""
    guard = Guard(settings)
    setattr(app.state, STATE_KEY, guard)
    app.add_middleware(SecurityMiddleware, guard=guard)
    if guard.hosts.any:
        log.warning("--allowed-hosts '*': the Host header is not checked (DNS rebinding is possible)")
    elif not is_loopback(settings.host):
        log.info("answering to Host names: %s (--allowed-hosts / ZIMAGE_ALLOWED_HOSTS adds more)",
                 ", ".join(guard.hosts.names))
    return guard


def check_exposure(settings: "Settings") -> None:
    """Refuse to serve other machines without auth unless asked to on purpose. Raises SettingsError."""
    from .settings import SettingsError

    if is_loopback(settings.host) or settings.auth or settings.allow_public_no_auth:
        return
    raise SettingsError(
        f"--host {settings.host} serves other machines, but no --auth / ZIMAGE_AUTH is set: anyone who reaches "
        "the port could generate images and see recent prompts in the History tab. Set --auth user:password, or "
        "pass --allow-public-no-auth (ZIMAGE_ALLOW_PUBLIC_NO_AUTH=1) to serve it without auth on purpose.")
