"""Who may do what over HTTP: the one place where access decisions are made.

Every HTTP request passes ``AccessGate`` before any route runs. It works out the
``Principal`` behind the request and checks the request against ``RULES``:

* **staff** - a request without credentials from one of ``staff_networks`` (the hospital's
  own networks), until user authentication exists; it may do everything. User logins (OIDC
  bearer tokens, API keys, roles) belong here, as more kinds of principal.
* **share** - a request carrying a share session (``Authorization: Bearer …`` or the
  ``access_token`` query parameter of RFC 6750), which the patient page or OHIF got from a
  share link. It may read that one study and nothing else: study-scoped GET routes whose
  study is its own, searches (which the search handlers narrow to its study, see
  ``study_scope``) and, when the share allows it, downloads.
* **anonymous** - anything else: public routes only (the share pages, the viewer's code,
  health).

A credential that is present but not valid (forged, expired, revoked share, or empty) is
refused with 401; it never falls back to the network's rights. Other ``Authorization`` schemes
(``Basic`` from a reverse proxy's own log-in) are not this server's credentials: ignored.

The client's address is the peer's or, from a trusted proxy, the right-most address of
``X-Forwarded-For`` that is not itself a trusted proxy (``client_address``). An entry there
that is not an address makes the client unknown: it never gets the proxy's own rights.

Because staff carry no credential, a web page from elsewhere opened on a staff workstation
could make the browser send requests as staff (cross-site request forgery). Requests that
change something (any method but GET/HEAD/OPTIONS) are therefore refused when the browser
says they come from another site: ``Sec-Fetch-Site: cross-site``, or an ``Origin`` that is
neither this server nor one of ``cors_allowed_origins``. "This server" is the ``Host`` the
request names, the origin of ``public_url``, and, from a trusted proxy, ``X-Forwarded-Proto``
with ``X-Forwarded-Host`` (a TLS proxy that sends its upstream's name as ``Host`` would make
every PIN entry on the public page cross-site). Tools that are not browsers send neither
header and are not affected.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import hmac
import html
import ipaddress
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pacs.http_input import under_prefix
from pacs.settings import Settings
from storage.errors import NotFound
from storage.shares import Share, ShareState, ShareStore

log = logging.getLogger("pacs.access")

SCOPE_KEY = "pacs.principal"
# How an error or a refusal is told under a path prefix whose clients expect their own format
# (``{"/fhir": OperationOutcome}``): (status, message) -> response. Elsewhere the server's
# JSON (``{"status": ..., "message": ...}``) or, for pages, HTML.
ErrorBodies = Mapping[str, Callable[[int, str], Response]]
_SHARE_CACHE_SECONDS = 3.0


class Role(enum.Enum):
    STAFF = "staff"
    SHARE = "share"
    ANONYMOUS = "anonymous"


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is behind a request."""

    role: Role
    address: str
    share: Share | None = None
    session: str = ""  # the share session (one opening of the link)

    @property
    def study_uid(self) -> str | None:
        return self.share.study_instance_uid if self.share else None


class Rule(enum.Enum):
    PUBLIC = "public"  # anyone
    STUDY = "study"  # staff, or a share of the study named in the path
    DOWNLOAD = "download"  # as STUDY, and the share must allow downloads
    SEARCH = "search"  # staff, or a share: the handler narrows the search to its study
    WADO_URI = "wado-uri"  # as STUDY, the study named by the studyUID parameter
    STAFF = "staff"  # staff only (the default for every path not listed)


_READ = frozenset({"GET", "HEAD"})
# (methods, path pattern, rule); the first match decides. A path not listed is staff-only.
RULES: list[tuple[frozenset[str], re.Pattern[str], Rule]] = [
    (frozenset({"GET", "HEAD", "OPTIONS"}), re.compile(r"/healthz"), Rule.PUBLIC),
    (_READ, re.compile(r"/static/[^/]+"), Rule.PUBLIC),
    (_READ, re.compile(r"/favicon\.ico"), Rule.PUBLIC),
    (_READ, re.compile(r"/s/[^/]+/?"), Rule.PUBLIC),  # the share page checks its token
    (frozenset({"POST"}), re.compile(r"/api/s/[^/]+/session"), Rule.PUBLIC),
    # The viewer's code and generated configuration; its data comes through /dicomweb.
    (_READ, re.compile(r"/ohif(/.*)?"), Rule.PUBLIC),
    (_READ, re.compile(r"/dicomweb/openapi\.json"), Rule.PUBLIC),
    # Whole instances as DICOM files: a download (the viewer needs metadata and frames only).
    (_READ, re.compile(r"/dicomweb/studies/(?P<study>[^/]+)(/series/[^/]+(/instances/[^/]+)?)?"),
     Rule.DOWNLOAD),
    (_READ, re.compile(r"/dicomweb/studies/(?P<study>[^/]+)(/.*)?"), Rule.STUDY),
    (_READ, re.compile(r"/dicomweb/(studies|series|instances)"), Rule.SEARCH),
    (_READ, re.compile(r"/(dicomweb/)?wado"), Rule.WADO_URI),
    (_READ, re.compile(r"/api/studies/(?P<study>[^/]+)/film\.(pdf|png)"), Rule.STUDY),
    (_READ, re.compile(r"/api/studies/(?P<study>[^/]+)/download"), Rule.DOWNLOAD),
]


@dataclasses.dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int = 200
    message: str = ""


def decide(principal: Principal, method: str, path: str, query: QueryParams) -> Decision:
    """May ``principal`` make this request? (Pure: no I/O, easy to test on its own.)"""
    rule, study = Rule.STAFF, None
    for methods, pattern, candidate in RULES:
        match = pattern.fullmatch(path)
        if match and method in methods:
            rule, study = candidate, match.groupdict().get("study")
            break
    if rule is Rule.PUBLIC or principal.role is Role.STAFF:
        return Decision(True)
    if principal.role is Role.ANONYMOUS:
        return Decision(False, 401, "đăng nhập hoặc dùng liên kết chia sẻ / sign in or use "
                                    "a share link")
    if rule is Rule.WADO_URI:
        study = query.get("studyUID")
        if "application/dicom" in query.get("contentType", ""):
            rule = Rule.DOWNLOAD
    own = principal.study_uid
    if rule is Rule.SEARCH:
        return Decision(True)
    if rule in (Rule.STUDY, Rule.DOWNLOAD, Rule.WADO_URI) and study == own:
        if rule is Rule.DOWNLOAD and not principal.share.allow_download:
            return Decision(False, 403, "liên kết này không cho phép tải về / this link does "
                                        "not allow downloads")
        return Decision(True)
    return Decision(False, 403, "liên kết chia sẻ chỉ mở được một ca chụp / a share link "
                                "opens one study only")


def study_scope(request: Request) -> str | None:
    """The one study a request is limited to (a share), or None for no limit (staff)."""
    principal = request.scope.get(SCOPE_KEY)
    return principal.study_uid if principal is not None else None


def principal_of(request: Request) -> Principal:
    return request.scope[SCOPE_KEY]


# ---------------------------------------------------------------------------- secrets, grants


def server_secret(settings: Settings) -> bytes:
    """The key behind share tokens and sessions: the setting, else ``data_dir/secret.key``
    (32 random bytes, created once, readable by the server's user only)."""
    if settings.secret_key:
        return settings.secret_key.encode()
    path = Path(settings.data_dir) / "secret.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)  # two processes starting at once keep one key each way
    return path.read_text().strip().encode()


@dataclasses.dataclass(frozen=True)
class Grant:
    """A signed share session: which share, which opening, until when."""

    share_id: int
    session: str
    expires: int  # Unix time

    def encode(self, secret: bytes) -> str:
        payload = f"{self.share_id}.{self.session}.{self.expires}"
        return f"{payload}.{_sign(secret, payload)}"

    @classmethod
    def decode(cls, text: str, secret: bytes) -> Grant | None:
        """The grant in ``text`` if its signature holds and it has not expired."""
        if not text.isascii():  # a forgery (and str.isdigit would take "²" for a digit)
            return None
        parts = text.split(".")
        if len(parts) != 4 or not parts[0].isdigit() or not parts[2].isdigit():
            return None
        payload = ".".join(parts[:3])
        if not hmac.compare_digest(_sign(secret, payload), parts[3]):
            return None
        grant = cls(int(parts[0]), parts[1], int(parts[2]))
        return grant if grant.expires > time.time() else None


def _sign(secret: bytes, payload: str) -> str:
    digest = hmac.new(secret, b"share-grant\0" + payload.encode(), "sha256").digest()
    return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")


# ---------------------------------------------------------------------------- the policy


class AccessPolicy:
    """Turns requests into principals and records what shares are used for."""

    def __init__(self, settings: Settings, shares: ShareStore, secret: bytes) -> None:
        self.settings = settings
        self.shares = shares
        self.secret = secret
        self.staff_networks = _Networks(settings.staff_networks)
        self.trusted_proxies = _Networks(settings.trusted_proxies)
        self._warned_forwarders: set[str] = set()
        self._cache: dict[int, tuple[float, Share | None]] = {}
        self._recorded: OrderedDict[tuple[str, ...], None] = OrderedDict()

    def open_session(self, share: Share) -> tuple[str, dt.datetime]:
        """A new signed session for an opened share (ends with the share at the latest)."""
        hours = dt.timedelta(hours=self.settings.share_session_hours)
        until = min(dt.datetime.now(dt.UTC) + hours, share.expires_at)
        grant = Grant(share.id, secrets.token_hex(6), int(until.timestamp()))
        return grant.encode(self.secret), until

    def reusable_session(self, credential: str, share: Share) -> tuple[str, dt.datetime] | None:
        """``credential`` again, with its end, if it is a valid session of ``share`` (a
        reload of the page keeps its session instead of opening the share again)."""
        grant = Grant.decode(credential, self.secret)
        if grant is None or grant.share_id != share.id:
            return None
        return credential, dt.datetime.fromtimestamp(grant.expires, dt.UTC)

    def forwarded_by_trusted_proxy(self, scope: Scope) -> bool:
        """Whether a proxy in ``trusted_proxies`` forwarded the request (``X-Forwarded-For``
        present, and uvicorn took the client from it or kept the proxy's own address), so that
        its ``X-Forwarded-Host`` and ``X-Forwarded-Proto`` are believed.

        Like the staff decision, this cannot tell a client that names itself in
        ``X-Forwarded-For`` from a proxy's client; a browser cannot send these headers to
        another site without a CORS preflight, which this server does not grant."""
        if _header(scope, b"x-forwarded-for") is None:
            return False
        peer = (scope.get("client") or ("", 0))[0]
        address = _forwarded_host(peer) or peer
        return address in self.trusted_proxies or self._forwarded_client(scope) == address

    def forget(self, share_id: int) -> None:
        """Drop a cached share (revoked, unlocked) so the change applies at once here."""
        self._cache.pop(share_id, None)

    async def principal_for(self, scope: Scope, query: QueryParams | None = None
                            ) -> Principal | None:
        """The principal of a request; None when it carries a credential that is not valid."""
        address = self.client_address(scope)
        if query is None:
            query = QueryParams(scope.get("query_string", b"").decode("latin-1"))
        credential = _credential(scope, query)
        if credential is None:
            staff = (address in self.staff_networks
                     and not self._forwarded_by_stranger(scope, address))
            return Principal(Role.STAFF if staff else Role.ANONYMOUS, address)
        grant = Grant.decode(credential, self.secret)
        if grant is None:
            return None
        share = await self._share(grant.share_id)
        if share is None or share.state() is not ShareState.ACTIVE:
            return None
        return Principal(Role.SHARE, address, share, grant.session)

    async def record_use(self, principal: Principal, action: str, detail: str = "") -> None:
        """Log a share's use once per session, action and detail (not every image)."""
        if principal.share is None:
            return
        key = (principal.session, action, detail)
        if key in self._recorded:
            return
        self._recorded[key] = None
        while len(self._recorded) > 10_000:
            self._recorded.popitem(last=False)
        await run_in_threadpool(self.shares.record, principal.share.id, action,
                                address=principal.address, detail=detail,
                                session=principal.session)

    def client_address(self, scope: Scope) -> str:
        """Who sent the request: "" when a trusted proxy forwarded it for an address that is
        not one (an empty or garbled ``X-Forwarded-For`` entry).

        uvicorn has already replaced the peer by the forwarded client when it found one; when
        the address is still a trusted proxy's and the request was forwarded, uvicorn kept the
        proxy's address for an entry it could not use, and this works the client out again:
        otherwise a loopback proxy would turn ``X-Forwarded-For: garbage, ,,`` into staff."""
        peer = (scope.get("client") or ("", 0))[0]
        # uvicorn passes a forwarded address as it was written (2001:DB8::7, ::ffff:...):
        # one spelling for each address, for comparisons and the access log.
        address = _forwarded_host(peer) or peer
        if address not in self.trusted_proxies:
            return address
        named = self._forwarded_client(scope)
        return address if named is None else named

    def _forwarded_client(self, scope: Scope) -> str | None:
        """The client ``X-Forwarded-For`` names, as uvicorn picks it (the right-most entry
        that is not a trusted proxy); None without the header, "" when an entry is garbled."""
        forwarded = [v.decode("latin-1") for k, v in scope.get("headers", ())
                     if k == b"x-forwarded-for"]
        if not forwarded:
            return None
        entries = [entry.strip() for entry in ", ".join(forwarded).split(",")]
        for entry in reversed(entries):
            host = _forwarded_host(entry)
            if host is None:
                return ""
            if host not in self.trusted_proxies:
                return host
        return _forwarded_host(entries[0]) or ""  # every one a proxy: the first is the client

    def _forwarded_by_stranger(self, scope: Scope, address: str) -> bool:
        """Whether a peer that is not a trusted proxy says it forwards someone else's request.

        Such a peer is a proxy missing from ``trusted_proxies`` (or a client forging the
        header): its own address, often inside the hospital, must not make everyone it
        forwards staff. uvicorn has replaced a trusted proxy's address by the client's, which
        is then the one ``X-Forwarded-For`` names; here it names another."""
        if address in self.trusted_proxies or _forwarded_host(address) is None:
            return False  # a proxy we trust, or not an address at all (no staff rights anyway)
        named = self._forwarded_client(scope)
        if named is None or named == address:
            return False
        if address not in self._warned_forwarders:
            self._warned_forwarders.add(address)
            log.warning("%s sends X-Forwarded-For but is not in trusted_proxies: the requests "
                        "it forwards get no staff rights (add the proxy to trusted_proxies)",
                        address)
        return True

    async def _share(self, share_id: int) -> Share | None:
        cached = self._cache.get(share_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        try:
            share = await run_in_threadpool(self.shares.get, share_id)
        except NotFound:
            share = None
        self._cache[share_id] = (time.monotonic() + _SHARE_CACHE_SECONDS, share)
        return share


def _credential(scope: Scope, query: QueryParams) -> str | None:
    """The share session a request carries, None when it carries none. An empty one
    (``Bearer `` or ``?access_token=``) is returned as "": present, so refused, not taken
    for no credential at all."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            kind, _, token = value.decode("latin-1").strip().partition(" ")
            if kind.lower() == "bearer":
                return token.strip()
    if "access_token" in query:
        return query["access_token"]
    return None


class _Networks:
    """``staff_networks`` or ``trusted_proxies``: addresses and networks (the settings refuse
    anything else); ``host in networks`` for an address, False for anything else."""

    def __init__(self, entries: tuple[str, ...]) -> None:
        self.networks = [ipaddress.ip_network(entry, strict=False) for entry in entries]

    def __contains__(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)


_DOTTED_UID = re.compile(r"[0-9]+(\.[0-9]+)+")


def _route_words(app: object) -> frozenset[str]:
    """The fixed segments of ``app``'s route paths (``dicomweb``, ``studies``, ``fhir``...)."""
    words: set[str] = set()
    routes = list(getattr(app, "routes", []))
    while routes:
        route = routes.pop()
        words.update(part for part in getattr(route, "path", "").split("/")
                     if part and "{" not in part)
        routes.extend(getattr(route, "routes", None) or [])  # a Mount's own routes
    return frozenset(words)


def _loggable_path(path: str, words: frozenset[str]) -> str:
    """``path`` for the log before any route has read it: the words of routes and UIDs kept,
    anything else (an accession number, a patient ID, a share token) replaced by ``…``."""
    return "/".join(part if not part or part in words or _DOTTED_UID.fullmatch(part) else "…"
                    for part in path.split("/"))


def _forwarded_host(entry: str) -> str | None:
    """The IP address of one ``X-Forwarded-For`` entry (``a.b.c.d``, ``a.b.c.d:port``,
    ``::1``, ``[::1]:port``), None when it is not one."""
    if entry.startswith("["):
        entry, closed, port = entry[1:].partition("]")
        if not closed or (port and not (port[:1] == ":" and port[1:].isdigit())):
            return None
    elif entry.count(":") == 1:
        entry, _, port = entry.partition(":")
        if not port.isdigit():
            return None
    try:
        return str(ipaddress.ip_address(entry))
    except ValueError:
        return None


# ---------------------------------------------------------------------------- the gate


class AccessGate:
    """ASGI middleware: every HTTP request is decided here before it reaches a route."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy,
                 bodies: ErrorBodies | None = None) -> None:
        self.app = app
        self.policy = policy
        self.bodies = bodies or {}  # refusals under these path prefixes in their clients' form
        self.allowed_origins = {o.rstrip("/").lower()
                                for o in policy.settings.cors_allowed_origins}
        public = policy.settings.public_url
        self.public_origin = _origin(public) if public else None
        self._route_words: frozenset[str] | None = None  # known at the first request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        query = QueryParams(scope.get("query_string", b"").decode("latin-1"))
        principal = await self.policy.principal_for(scope, query)
        if principal is None:
            decision = Decision(False, 401, "phiên chia sẻ không hợp lệ hoặc đã hết hạn / the "
                                            "share session is not valid or has expired")
        elif method not in _SAFE_METHODS and self._cross_site(scope):
            decision = Decision(False, 403, "yêu cầu từ trang web khác bị từ chối / a request "
                                            "from another site cannot change anything here")
        else:
            decision = decide(principal, method, path, query)
        if not decision.allowed:
            if principal is not None and principal.role is Role.SHARE:
                if self._route_words is None:
                    self._route_words = _route_words(scope.get("app"))
                log.warning("share %d refused: %s %s", principal.share.id, method,
                            _loggable_path(path, self._route_words))
            await _denied(scope, decision, self.bodies)(scope, receive, send)
            return
        scope[SCOPE_KEY] = principal
        if principal.role is Role.SHARE:
            action, detail = _use_of(path, query)
            if action:
                await self.policy.record_use(principal, action, detail)
        await self.app(scope, receive, send)

    def _cross_site(self, scope: Scope) -> bool:
        """Whether a browser marked the request as sent by a page of another site."""
        origin = (_header(scope, b"origin") or "").rstrip("/").lower()
        if origin in self.allowed_origins:  # a viewer this server was told to trust
            return False
        if (_header(scope, b"sec-fetch-site") or "").lower() == "cross-site":
            return True
        if not origin:
            return False
        if origin == "null":
            return True
        if origin.split("://", 1)[-1] == (_header(scope, b"host") or "").lower():
            return False
        named = _origin(origin)
        return not named or named not in self._own_origins(scope)

    def _own_origins(self, scope: Scope) -> set[str]:
        """The origins this server has besides its ``Host``: ``public_url``'s, and the one a
        trusted proxy names (``X-Forwarded-Proto``://``X-Forwarded-Host``)."""
        own = {self.public_origin} if self.public_origin else set()
        forwarded_host = _header(scope, b"x-forwarded-host")
        if forwarded_host and self.policy.forwarded_by_trusted_proxy(scope):
            # Proxies one behind another append: the first is the name the browser used.
            host = forwarded_host.split(",")[0].strip()
            proto = (_header(scope, b"x-forwarded-proto") or scope.get("scheme", "http"))
            own.add(_origin(f"{proto.split(',')[0].strip()}://{host}"))
        return own - {""}


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), None when absent."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of a URL as browsers write an ``Origin`` (lower case, no
    default port, no path); "" for something that is not a URL."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return ""
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if not scheme or not host:
        return ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{scheme}://{host}" + (f":{port}" if port and port != _DEFAULT_PORTS.get(scheme)
                                   else "")


def _use_of(path: str, query: QueryParams) -> tuple[str, str]:
    """What a share's request is, for its access log: (action, detail)."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["dicomweb", "studies"] and len(parts) > 2:
        series = parts[4] if len(parts) > 4 and parts[3] == "series" else ""
        last = parts[-1]
        if last in ("rendered", "thumbnail"):
            return "view", series
        if last == "metadata" or "frames" in parts or "bulkdata" in parts:
            return "viewer", series
        if len(parts) <= 7 and last not in ("series", "instances"):
            return "retrieve-dicom", series
    if parts in (["wado"], ["dicomweb", "wado"]):  # WADO-URI: the same uses, by parameters
        series = query.get("seriesUID", "")
        if "application/dicom" in query.get("contentType", ""):  # as ``decide`` reads it
            return "retrieve-dicom", series
        return "view", series
    return "", ""


def _denied(scope: Scope, decision: Decision, bodies: ErrorBodies) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="pacs"'} if decision.status == 401 else {}
    path = scope["path"]
    body = under_prefix(bodies, path)  # clients with a format of their own (FHIR)
    if body is not None:
        response = body(decision.status, decision.message)
        response.headers.update(headers)
        return response
    if path.startswith(("/dicomweb", "/api", "/wado", "/metrics")):
        return JSONResponse({"status": decision.status, "message": decision.message},
                            status_code=decision.status, headers=headers)
    title = "Cần đăng nhập / Sign-in needed" if decision.status == 401 else \
        "Không được phép / Not allowed"
    body = (f"<!doctype html><html lang=vi><meta charset=utf-8><meta name=viewport "
            f"content='width=device-width,initial-scale=1'><title>{title}</title>"
            f"<body style='font-family:system-ui;max-width:40rem;margin:2rem auto;padding:0 "
            f"1rem'><h1>{title}</h1><p>{html.escape(decision.message)}</p></body></html>")
    return HTMLResponse(body, status_code=decision.status, headers=headers)


__all__ = ["AccessGate", "AccessPolicy", "Decision", "Grant", "Principal", "Role", "RULES",
           "decide", "principal_of", "server_secret", "study_scope"]
