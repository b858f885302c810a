"""Who may talk to the explorer: its own page, on a Host it knows, with its token where it has one.

Listening on 127.0.0.1 keeps other machines out but not other web pages in the user's browser: a
page whose name is re-pointed at 127.0.0.1 (DNS rebinding) sends requests with its own Host, and any
page can send a form or a fetch with its own Origin. So, before any route runs:

- the Host header must name a loopback host (``localhost``, ``127.0.0.1``, ``[::1]``, any port) or
  the address the server was started on with its port; else 403;
- with a token, every request must carry it: as ``?token=`` (the URL `cltrace serve` prints, which
  also sets a cookie so that the page's own requests carry it), the cookie, or an
  ``Authorization: token ...`` header; else 401;
- a request that changes state (PUT, POST, DELETE, PATCH) with an Origin header must come from the
  server's own origin (``http://`` and the request's Host); else 403. Without an Origin (curl, the
  CLI) it is served: browsers always send one on such requests.

Listening beyond loopback needs a token (`access_token`): one is generated unless given.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from starlette.responses import JSONResponse

from cltrace.errors import CltraceError

#: Host names that always reach this machine only (the port may be any: the name is what matters).
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
#: Methods that change what is on disk or start work.
STATE_CHANGING = frozenset({"PUT", "POST", "DELETE", "PATCH"})
#: Addresses meaning "every interface": the Host a client uses cannot be known, the token guards.
WILDCARDS = frozenset({"0.0.0.0", "::"})


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps every other machine out."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def access_token(host: str, token: str | None) -> str | None:
    """The token the server on `host` requires: `token` when given; off loopback one is generated
    when none is given, and an empty one is refused; on loopback none unless given."""
    if token is not None and not token.strip():
        if is_loopback(host):
            return None
        raise CltraceError(f"--host {host} is beyond loopback and --token is empty: serving it without a token "
                           "would let anyone on the network read and change the graphs; give a token or omit --token")
    if token is not None:
        token = token.strip()
        if not all("!" <= c <= "~" for c in token):
            raise CltraceError("--token holds spaces or characters that are not printable ASCII: use letters, digits and punctuation")
        return token
    return None if is_loopback(host) else secrets.token_urlsafe(24)


def url(host: str, port: int, token: str | None = None) -> str:
    """The address to open: http://HOST:PORT/, with ``?token=`` where the server has one."""
    name = f"[{host}]" if ":" in host else host
    return f"http://{name}:{port}/" + (f"?token={quote(token, safe='')}" if token else "")


def cookie_name(port: int) -> str:
    """The token's cookie: one per port, since cookies are shared by every port of a host."""
    return f"cltrace-token-{port}"


def _refuse(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


class Guard:
    """ASGI middleware enforcing the Host allow-list, the token and the Origin check (module doc)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None, token: str | None = None) -> None:
        self.app, self.token, self.port = app, token, port
        bound = f"[{host}]" if ":" in host and not host.startswith("[") else host
        self.any_host = host in WILDCARDS
        self.hosts = {bound.lower()} | (set() if port is None else {f"{bound.lower()}:{port}"})

    def host_allowed(self, host: str) -> bool:
        """Whether a request's Host header names this server (see the module doc)."""
        host = host.strip().lower()
        if self.any_host or host in self.hosts:
            return True
        name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        if not name:
            name, port = host, ""
        return name in LOOPBACK_NAMES and (port == "" or port.isdigit())

    def presented_token(self, scope: dict, headers: dict[bytes, bytes]) -> tuple[str | None, bool]:
        """(the token the request carries, whether it came in the URL)."""
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if query.get("token"):
            return query["token"][0], True
        auth = headers.get(b"authorization", b"").decode("latin-1").strip()
        if auth.lower().startswith("token "):
            return auth[6:].strip(), False
        try:
            jar = SimpleCookie(headers.get(b"cookie", b"").decode("latin-1"))
        except CookieError:
            return None, False
        name = cookie_name(self.port or 0)
        return (unquote(jar[name].value) if name in jar else None), False

    def check(self, scope: dict) -> tuple[JSONResponse | None, str | None]:
        """(the refusal, or None; a Set-Cookie header value to add when the URL carried the token)."""
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.host_allowed(host):
            shown = host.encode("ascii", "replace").decode()[:100] or "none"
            return _refuse(403, f"Host '{shown}' is not this server's: open it as http://127.0.0.1 or http://localhost"), None
        cookie = None
        if self.token is not None:
            given, in_url = self.presented_token(scope, headers)
            if given is None or not hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode()):
                return _refuse(401, "this server needs its token: open the URL `cltrace serve` printed (with ?token=) "
                                    "or send the header 'Authorization: token ...'"), None
            if in_url:
                cookie = f"{cookie_name(self.port or 0)}={quote(self.token, safe='')}; Path=/; HttpOnly; SameSite=Strict"
        origin = headers.get(b"origin")
        if scope.get("method", "GET").upper() in STATE_CHANGING and origin is not None:
            if origin.decode("latin-1").strip().lower() != f"http://{host.strip().lower()}":
                shown = origin.decode("ascii", "replace")[:100]
                return _refuse(403, f"Origin '{shown}' is not this server's own page: changes come only from the explorer itself"), None
        return None, cookie

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal, cookie = self.check(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if cookie is None:
            return await self.app(scope, receive, send)

        async def with_cookie(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode("latin-1"))]}
            await send(message)

        await self.app(scope, receive, with_cookie)
