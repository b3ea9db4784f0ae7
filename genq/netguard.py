"""SSRF guard for outbound HTTP to untrusted URLs (job output URLs, webhook URLs).

Two layers. ``check_url`` vets the URL text (scheme, userinfo, host syntax, allow-list, IP literals in
any spelling ``inet_aton`` accepts) without DNS. ``guarded_session`` vets the address each socket really
connects to: its connection classes resolve the name themselves, check every candidate and connect to
the vetted IP, so a DNS answer cannot change between the check and the connect (no rebinding gap).
``safe_get`` ties both together and follows redirects by hand, re-checking every Location.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.poolmanager import PoolManager
from urllib3.util.connection import allowed_gai_family

from genq.errors import DownloadRefused
from genq.settings import OutboundRules
from genq.wallclock import tracking

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NUMBER = re.compile(r"0x[0-9a-f]*|[0-9]+")  # a label inet_aton would read as a number
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
# Ranges not covered (on every Python 3.11 patch release) by the ipaddress flags checked below.
_EXTRA_REFUSED = {
    "shared address space": ipaddress.ip_network("100.64.0.0/10"),
    "unique-local": ipaddress.ip_network("fc00::/7"),
    "NAT64 local-use": ipaddress.ip_network("64:ff9b:1::/48"),
}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_FLAGS = ("loopback", "unspecified", "link_local", "multicast", "site_local", "private", "reserved")


@dataclass(frozen=True)
class NetPolicy:
    allow_http: bool = False  # https only unless True
    allowed_hosts: tuple[str, ...] = ()  # exact names or "*.example.com"; empty = any host
    allow_private: bool = False  # local development/tests only (the simulator on 127.0.0.1)
    allowed_networks: tuple[str, ...] = ()  # CIDRs allowed even though private
    max_redirects: int = 0  # 0 = redirects refused

    def __post_init__(self) -> None:
        # Fail at configuration time, not on the first download.
        for cidr in self.allowed_networks:
            ipaddress.ip_network(cidr)  # ValueError on a typo or host bits set
        for pattern in self.allowed_hosts:
            if "*" in pattern.removeprefix("*."):
                raise ValueError(f"allowed host {pattern!r}: only a leading '*.' wildcard is supported")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must be >= 0")


def policy_from(rules: OutboundRules, max_redirects: int = 0) -> NetPolicy:
    """The guard's policy from a settings group (downloads, callbacks)."""
    return NetPolicy(
        allow_http=rules.allow_http,
        allowed_hosts=tuple(rules.allowed_hosts),
        allow_private=rules.allow_private,
        allowed_networks=tuple(rules.allowed_networks),
        max_redirects=max_redirects,
    )


def redact_url(url: str) -> str:
    """The URL without query or fragment (presigned URLs carry tokens there) or credentials."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparseable URL)"
    host = parts.netloc.rpartition("@")[2]  # keeps IPv6 brackets and the port; drops credentials
    return f"{parts.scheme}://{host}{parts.path}"


def _shown(url: str) -> str:
    """The URL for messages: no query or fragment (tokens), never an exception of its own."""
    try:
        return repr(redact_url(url))
    except ValueError:
        return "(unparseable URL)"


def check_url(url: str, policy: NetPolicy) -> str:
    """Vet ``url`` without DNS and return its normalized host (IPs in canonical form)."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F or c == "\\" for c in url):
        raise DownloadRefused(f"refused {_shown(url)}: control character, whitespace or backslash")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise DownloadRefused(f"refused {_shown(url)}: malformed URL") from None
    allowed = {"https", "http"} if policy.allow_http else {"https"}
    if parts.scheme not in allowed:
        raise DownloadRefused(f"refused {_shown(url)}: scheme {parts.scheme or '(none)'!r} not allowed")
    if "@" in parts.netloc:  # credentials, or the classic "trusted.com@evil" confusion
        raise DownloadRefused(f"refused {_shown(url)}: userinfo in URL")
    if port == 0:
        raise DownloadRefused(f"refused {_shown(url)}: port 0")
    host = parts.hostname or ""
    if ":" in host or "[" in parts.netloc:  # brackets hold an IPv6 literal and nothing else
        try:
            ip: IPAddress | None = ipaddress.IPv6Address(host)
        except ValueError:
            raise DownloadRefused(f"refused {_shown(url)}: malformed IPv6 host") from None
    else:
        host = host[:-1] if host.endswith(".") else host  # one root dot is the same name
        if not host.isascii() or not all(_LABEL.fullmatch(label) for label in host.split(".")):
            raise DownloadRefused(f"refused {_shown(url)}: invalid host {host!r}")
        ip = _parse_ipv4(host, url)
    if ip is not None:
        host = str(ip)
        if reason := _refusal(ip, policy):
            raise DownloadRefused(f"refused {_shown(url)}: address {host} is {reason}")
    elif not policy.allow_private and (host == "localhost" or host.endswith(".localhost")):
        raise DownloadRefused(f"refused {_shown(url)}: host {host!r} is loopback")
    if policy.allowed_hosts and not any(_host_matches(host, p) for p in policy.allowed_hosts):
        raise DownloadRefused(f"refused {_shown(url)}: host {host!r} is not in the allow-list")
    return host


def _parse_ipv4(host: str, url: str) -> ipaddress.IPv4Address | None:
    """Read ``host`` the way inet_aton (and so getaddrinfo) would: 127.1, 0x7f000001, 0177.0.0.1...

    As in the WHATWG URL standard, a host whose last label is a number is an IPv4 address or invalid.
    """
    labels = host.split(".")
    if not _NUMBER.fullmatch(labels[-1]):
        return None  # a name
    try:
        # 0x.. hex, 0.. octal (so 08 is invalid, as for inet_aton), else decimal
        numbers = [int(n, 16 if n.startswith("0x") else 8 if n.startswith("0") else 10) for n in labels]
    except ValueError:
        raise DownloadRefused(f"refused {_shown(url)}: malformed numeric host {host!r}") from None
    *head, last = numbers
    if len(numbers) > 4 or any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise DownloadRefused(f"refused {_shown(url)}: malformed numeric host {host!r}")
    value = sum(n << (8 * (3 - i)) for i, n in enumerate(head)) + last
    return ipaddress.IPv4Address(value)


def _host_matches(host: str, pattern: str) -> bool:
    pattern = pattern.lower().removesuffix(".")
    if pattern.startswith("*."):  # a subdomain, never the bare parent or "evilexample.com"
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def check_address(ip: str | IPAddress, policy: NetPolicy) -> None:
    """Refuse an address that is not publicly routable, unless the policy allows it."""
    try:
        address = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    except ValueError:
        raise DownloadRefused(f"refused address {ip!r}: not an IP address") from None
    reason = _refusal(address, policy)
    if reason:
        raise DownloadRefused(f"refused address {address}: {reason}")


def _refusal(ip: IPAddress, policy: NetPolicy) -> str | None:
    """Why ``ip`` is refused, or None."""
    if policy.allow_private or any(ip in ipaddress.ip_network(n) for n in policy.allowed_networks):
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        # These forms reach (or are translated to) an IPv4 host: judge that host as well.
        mapped = ip.ipv4_mapped
        if ip in _NAT64:
            mapped = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        compatible = ipaddress.IPv4Address(int(ip)) if 1 < int(ip) < 2**32 else None  # not :: or ::1
        for embedded in (mapped, compatible, ip.sixtofour, *(ip.teredo or ())):
            reason = _refusal(embedded, policy) if embedded is not None else None
            if reason:
                return f"{reason} (IPv4 {embedded} embedded in IPv6)"
        if mapped is not None:
            return None  # the IPv6 prefix itself is only a translation marker
    for name, network in _EXTRA_REFUSED.items():
        if ip in network:
            return name
    for flag in _FLAGS:
        if getattr(ip, f"is_{flag}", False):
            return flag.replace("_", "-")
    return None if ip.is_global else "not globally routable"


def _connect(conn: HTTPConnection, policy: NetPolicy) -> socket.socket:
    """urllib3's ``_new_conn`` with a check on the very addresses the socket connects to.

    Every candidate is vetted before any is tried: a rebinding DNS server could otherwise list a
    public address that fails fast followed by an internal one.
    """
    try:
        candidates = socket.getaddrinfo(conn._dns_host, conn.port, allowed_gai_family(), socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise NameResolutionError(conn.host, conn, exc) from exc
    for *_, sockaddr in candidates:
        address = ipaddress.ip_address(str(sockaddr[0]))
        reason = _refusal(address, policy)
        if reason:
            raise DownloadRefused(f"refused connection to {conn.host}:{conn.port} at {address}: {reason}")
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in candidates:
        sock = socket.socket(family, kind, proto)
        try:
            for option in conn.socket_options or ():
                sock.setsockopt(*option)
            if conn.timeout is None or isinstance(conn.timeout, int | float):
                sock.settimeout(conn.timeout)
            if conn.source_address:
                sock.bind(conn.source_address)
            sock.connect(sockaddr)  # the vetted IP; Host header and TLS SNI keep conn.host
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sys.audit("http.client.connect", conn, conn.host, conn.port)
        return sock
    if isinstance(error, TimeoutError):
        raise ConnectTimeoutError(conn, f"Connection to {conn.host} timed out") from error
    raise NewConnectionError(
        conn, f"Failed to establish a new connection: {error or 'no address'}"
    ) from error


def _pool_classes(policy: NetPolicy) -> dict[str, type[HTTPConnectionPool]]:
    # urllib3 builds connections from a class with fixed arguments, so the policy rides in a closure.
    class GuardedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return _connect(self, policy)

    class GuardedHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return _connect(self, policy)

    class GuardedHTTPPool(HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

    class GuardedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

    # Tracking, so that a wall-clock limit (genq.wallclock) can cut a call that drips.
    return {"http": tracking(GuardedHTTPPool), "https": tracking(GuardedHTTPSPool)}


class GuardedAdapter(HTTPAdapter):
    """An HTTPAdapter whose every socket goes through ``_connect``."""

    def __init__(self, policy: NetPolicy, **kwargs: Any) -> None:
        self.policy = policy  # before super().__init__, which calls init_poolmanager
        super().__init__(**kwargs)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **kw: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **kw)
        self.poolmanager.pool_classes_by_scheme = _pool_classes(self.policy)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> PoolManager:
        # A proxy resolves the name itself, out of reach of the address check.
        raise DownloadRefused("proxies are not allowed on a guarded session")


def guarded_session(policy: NetPolicy) -> requests.Session:
    """A Session whose connections are checked on the address actually connected to."""
    session = requests.Session()
    session.trust_env = False  # no proxies (see proxy_manager_for) nor .netrc credentials from the env
    session.max_redirects = policy.max_redirects  # a plain get() with redirects still obeys the cap
    adapter = GuardedAdapter(policy)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def safe_get(session: requests.Session, url: str, policy: NetPolicy, **kwargs: Any) -> requests.Response:
    """GET ``url``, following at most ``policy.max_redirects`` redirects, each Location re-checked."""
    kwargs["allow_redirects"] = False
    redirects = 0
    while True:
        check_url(url, policy)
        try:
            response = session.get(url, **kwargs)
        except requests.RequestException as exc:
            refused = _find_refusal(exc)
            if refused is None:
                raise
            raise refused from None
        location = session.get_redirect_target(response)
        if location is None:
            return response
        response.close()  # releases the connection even with stream=True
        redirects += 1
        if redirects > policy.max_redirects:
            raise DownloadRefused(
                f"refused {_shown(url)}: redirect {response.status_code} beyond the limit of "
                f"{policy.max_redirects}"
            )
        headers = kwargs.get("headers") or {}
        kwargs["headers"] = {k: v for k, v in headers.items() if k.lower() not in {"authorization", "cookie"}}
        kwargs.pop("auth", None)  # credentials never follow a redirect: the target may be another origin
        url = urljoin(url, location)


def _find_refusal(exc: BaseException | None) -> DownloadRefused | None:
    """The DownloadRefused a requests/urllib3 wrapper may carry (cause, context, reason or args[0])."""
    for _ in range(10):  # wrappers nest a few levels deep; bounded in case of a cycle
        if exc is None or isinstance(exc, DownloadRefused):
            return exc
        first = exc.args[0] if exc.args else None
        nested = (exc.__cause__, exc.__context__, getattr(exc, "reason", None), first)
        exc = next((e for e in nested if isinstance(e, BaseException)), None)
    return None
