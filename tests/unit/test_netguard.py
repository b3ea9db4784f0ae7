"""The SSRF guard without any network: URL and address tables, DNS rebinding with a fake resolver,
and redirect handling through ``responses``."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import responses

from genq.errors import DownloadRefused
from genq.netguard import NetPolicy, check_address, check_url, guarded_session, safe_get

HTTP = NetPolicy(allow_http=True)


@pytest.fixture(autouse=True)
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_url must never resolve; a test that needs a resolver installs its own."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"unexpected DNS lookup {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)


REFUSED_URLS = [
    # the brief's odd spellings of loopback, metadata and friends
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0x7F000001/",
    "http://0177.0.0.1/",
    "http://127.1/",
    "http://127.0.1/",
    "http://0x7f.1/",
    "http://0177.1/",
    "http://0/",
    "http://0.0.0.0/",
    "http://[::1]/",
    "http://[0:0:0:0:0:0:0:1]/",
    "http://[::]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[::127.0.0.1]/",
    "http://[64:ff9b::7f00:1]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[2002:7f00:1::]/",
    "http://[2002:a9fe:a9fe::1]/",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    "http://[fd00::1]/",
    "http://[fc00::1]/",
    "http://[fec0::1]/",
    "http://[ff02::1]/",
    "http://[64:ff9b:1::1]/",
    "http://169.254.169.254/latest/meta-data/",
    "http://2852039166/",
    "http://0xa9fea9fe/",
    "http://10.0.0.1/",
    "http://012.0.0.1/",
    "http://172.16.0.1/",
    "http://172.31.255.255/",
    "http://192.168.1.1/",
    "http://3232235777/",
    "http://100.64.0.1/",
    "http://224.0.0.1/",
    "http://239.255.255.250/",
    "http://255.255.255.255/",
    "http://240.0.0.1/",
    "http://198.18.0.1/",
    "http://127.0.0.1:8080/",
    "http://127.0.0.1./",
    "http://user@127.0.0.1/",
    "http://evil.com@127.0.0.1/",
    "http://user:pw@cdn.example.com/",
    "http://127.0.0.1#@evil.com/",
    "http://localhost/",
    "http://localhost./",
    "HTTP://LOCALHOST/",
    "http://api.localhost/",
    # malformed numbers are not names
    "http://1.2.3.4.5/",
    "http://256.0.0.1/",
    "http://0x100000000/",
    "http://1.2.65536/",
    "http://08.0.0.1/",
    "http://evil.0x7f/",
    # schemes, syntax, smuggling
    "file:///etc/passwd",
    "ftp://cdn.example.com/x.png",
    "gopher://127.0.0.1:6379/_FLUSHALL",
    "data:image/png;base64,AAAA",
    "javascript:alert(1)",
    "//cdn.example.com/x.png",
    "cdn.example.com/x.png",
    "http:///x.png",
    "http://",
    "http://cdn.example.com\x00.evil/",
    "http://cdn.example.com /x.png",
    "http://cdn.example.com\t/x.png",
    "http://cdn.example.com\\@127.0.0.1/",
    "http://cdn.example.com\n/x.png",
    "http://cdn..example.com/",
    "http://cdn.example.com../",
    "http://-cdn.example.com/",
    "http://cdn.ex%61mple.com/",
    "http://cdn.exämple.com/",
    "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/",  # fullwidth 127.0.0.1
    "http://[evil.com]/",
    "http://[::1/",
    "http://cdn.example.com:0/",
    "http://cdn.example.com:99999/",
    "http://cdn.example.com:abc/",
]


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_check_url_refuses(url: str) -> None:
    with pytest.raises(DownloadRefused):
        check_url(url, HTTP)


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://93.184.216.34/x.png", "93.184.216.34"),
        ("https://1572395042/x.png", "93.184.216.34"),
        ("https://cdn.example.com/x.png", "cdn.example.com"),
        ("https://CDN.Example.COM./x.png?sig=1", "cdn.example.com"),
        ("https://cdn.example.com:8443/a/b.mp4#frag", "cdn.example.com"),
        ("https://bucket_1.s3.example.com/x.png", "bucket_1.s3.example.com"),
        ("https://xn--exmple-cua.com/x.png", "xn--exmple-cua.com"),
        ("https://[2606:4700::1]/x.png", "2606:4700::1"),
        ("https://[::ffff:93.184.216.34]/x.png", "::ffff:5db8:d822"),
        ("https://[64:ff9b::5db8:d822]/x.png", "64:ff9b::5db8:d822"),
        ("https://[2002:5db8:d822::1]/x.png", "2002:5db8:d822::1"),
        ("https://8.8.8.8/x.png", "8.8.8.8"),
        ("https://1.2.3.4x.example.com/x.png", "1.2.3.4x.example.com"),
    ],
)
def test_check_url_accepts_public(url: str, host: str) -> None:
    assert check_url(url, NetPolicy()) == host


def test_http_needs_allow_http() -> None:
    with pytest.raises(DownloadRefused, match="scheme 'http'"):
        check_url("http://cdn.example.com/x.png", NetPolicy())
    assert check_url("http://cdn.example.com/x.png", HTTP) == "cdn.example.com"


def test_messages_name_reason_and_host_but_never_the_query() -> None:
    with pytest.raises(DownloadRefused) as info:
        check_url("http://169.254.169.254/latest?token=s3cr3t#sig=x", HTTP)
    message = str(info.value)
    assert "169.254.169.254" in message and "link-local" in message
    assert "s3cr3t" not in message and "sig=x" not in message
    with pytest.raises(DownloadRefused) as info:
        check_url("http://user:hunter2@cdn.example.com/?t=s3cr3t", HTTP)
    assert "userinfo" in str(info.value)
    assert "hunter2" not in str(info.value) and "s3cr3t" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://cdn.example.com/x.png", True),
        ("https://CDN.EXAMPLE.COM./x.png", True),
        ("https://a.b.example.com/x.png", True),
        ("https://example.com/x.png", False),  # the wildcard needs a subdomain
        ("https://evilexample.com/x.png", False),
        ("https://example.com.evil.net/x.png", False),
        ("https://files.example.org/x.png", True),
        ("https://files.example.org./x.png", True),
        ("https://sub.files.example.org/x.png", False),
        ("https://example.org/x.png", False),
        ("https://93.184.216.34/x.png", False),
    ],
)
def test_allowed_hosts(url: str, allowed: bool) -> None:
    policy = NetPolicy(allowed_hosts=("*.Example.com", "files.example.org."))
    if allowed:
        check_url(url, policy)
    else:
        with pytest.raises(DownloadRefused, match="allow-list"):
            check_url(url, policy)


def test_allowed_networks_carve_out_one_private_cidr() -> None:
    policy = NetPolicy(allowed_networks=("10.1.2.0/24",))
    check_url("https://10.1.2.7/hook", policy)
    check_address("10.1.2.255", policy)
    check_address("::ffff:10.1.2.7", policy)
    for other in ("10.1.3.7", "127.0.0.1", "169.254.169.254", "192.168.1.1"):
        with pytest.raises(DownloadRefused):
            check_address(other, policy)


def test_allow_private_allows_loopback() -> None:
    policy = NetPolicy(allow_http=True, allow_private=True)
    assert check_url("http://127.0.0.1:8000/x.png", policy) == "127.0.0.1"
    assert check_url("http://localhost:8000/x.png", policy) == "localhost"
    check_address("::1", policy)
    check_address(ipaddress.ip_address("10.0.0.1"), policy)


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "127.255.255.254",
        "0.0.0.0",
        "0.1.2.3",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "100.127.255.254",
        "224.0.0.1",
        "255.255.255.255",
        "240.0.0.1",
        "192.0.2.1",
        "::1",
        "::",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::127.0.0.1",
        "64:ff9b::7f00:1",
        "64:ff9b::a00:1",
        "64:ff9b:1::a00:1",
        "2002:7f00:1::",
        "2002:c0a8:101::1",
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
        "2001:0:4136:e378:8000:63bf:a247:2ddd",  # Teredo to public 93.184.216.34: 2001::/32 not global
        "fe80::1",
        "fe80::1%eth0",
        "fd00::1",
        "fec0::1",
        "ff02::1",
        "2001:db8::1",
        "not an ip",
        "",
    ],
)
def test_check_address_refuses(ip: str) -> None:
    with pytest.raises(DownloadRefused):
        check_address(ip, NetPolicy())


@pytest.mark.parametrize(
    "ip",
    ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700::1", "::ffff:93.184.216.34", "64:ff9b::808:808"],
)
def test_check_address_accepts_public(ip: str) -> None:
    check_address(ip, NetPolicy())
    check_address(ipaddress.ip_address(ip), NetPolicy())


def test_policy_validates_its_configuration() -> None:
    with pytest.raises(ValueError):
        NetPolicy(allowed_networks=("10.1.2.5/24",))
    with pytest.raises(ValueError):
        NetPolicy(allowed_hosts=("cdn.*.com",))
    with pytest.raises(ValueError):
        NetPolicy(max_redirects=-1)


# --- the connection-level check, with a fake resolver and fake sockets ---------------------------


class FakeSocket:
    """Records where it was asked to connect, then refuses, so nothing leaves the machine."""

    connected: list[Any] = []

    def __init__(self, *args: Any) -> None:
        pass

    def setsockopt(self, *args: Any) -> None:
        pass

    def settimeout(self, timeout: Any) -> None:
        pass

    def connect(self, sockaddr: Any) -> None:
        FakeSocket.connected.append(sockaddr)
        raise ConnectionRefusedError("fake")

    def close(self) -> None:
        pass


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[str]]]:
    """``answers[name]`` is what the fake DNS returns; every lookup is counted in ``answers['_calls']``."""
    answers: dict[str, list[str]] = {"_calls": []}

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        answers["_calls"].append(host)
        out = []
        for ip in answers[host]:
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            out.append((family, socket.SOCK_STREAM, 6, "", (ip, port)))
        return out

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "socket", FakeSocket)
    FakeSocket.connected = []
    yield answers


def test_guarded_session_refuses_public_name_resolving_to_loopback(resolver: dict[str, list[str]]) -> None:
    resolver["cdn.example.com"] = ["127.0.0.1"]
    url = "https://cdn.example.com/x.png?token=s3cr3t"
    assert check_url(url, NetPolicy()) == "cdn.example.com"  # the name alone looks fine
    with pytest.raises(DownloadRefused, match="loopback") as info:
        guarded_session(NetPolicy()).get(url, timeout=2)
    assert "cdn.example.com" in str(info.value) and "s3cr3t" not in str(info.value)
    assert FakeSocket.connected == []
    with pytest.raises(DownloadRefused, match="loopback"):
        safe_get(guarded_session(NetPolicy()), url, NetPolicy(), timeout=2)


def test_every_candidate_is_vetted_before_any_connect(resolver: dict[str, list[str]]) -> None:
    # a rebinding resolver lists a public address first and the real target second
    resolver["cdn.example.com"] = ["93.184.216.34", "169.254.169.254"]
    with pytest.raises(DownloadRefused, match="link-local"):
        guarded_session(NetPolicy()).get("https://cdn.example.com/x.png", timeout=2)
    assert FakeSocket.connected == []


def test_connects_to_the_vetted_address_without_resolving_again(resolver: dict[str, list[str]]) -> None:
    resolver["cdn.example.com"] = ["93.184.216.34", "2606:4700::1"]
    with pytest.raises(requests.ConnectionError):
        guarded_session(NetPolicy()).get("https://cdn.example.com/x.png", timeout=2)
    assert FakeSocket.connected == [("93.184.216.34", 443), ("2606:4700::1", 443)]
    assert resolver["_calls"] == ["cdn.example.com"]


def test_a_proxy_is_refused(resolver: dict[str, list[str]]) -> None:
    session = guarded_session(NetPolicy())
    with pytest.raises(DownloadRefused, match="prox"):
        session.get("https://cdn.example.com/x.png", proxies={"https": "http://10.0.0.1:3128"})


# --- redirects (``responses`` stands in for the adapter's send) -----------------------------------


@responses.activate
def test_redirect_refused_when_max_redirects_is_zero() -> None:
    responses.get("https://cdn.example.com/a", status=302, headers={"Location": "/b"})
    with pytest.raises(DownloadRefused, match="redirect 302"):
        safe_get(requests.Session(), "https://cdn.example.com/a?sig=s3cr3t", NetPolicy())


@responses.activate
def test_relative_redirect_resolved_and_credentials_dropped() -> None:
    responses.get("https://cdn.example.com/a/b", status=301, headers={"Location": "../c?x=1"})
    responses.get("https://cdn.example.com/c", status=200, body=b"ok")
    response = safe_get(
        requests.Session(),
        "https://cdn.example.com/a/b",
        NetPolicy(max_redirects=1),
        headers={"Authorization": "Bearer k", "Accept": "image/*"},
    )
    assert response.content == b"ok"
    assert responses.calls[1].request.url == "https://cdn.example.com/c?x=1"
    assert "Authorization" not in responses.calls[1].request.headers
    assert responses.calls[1].request.headers["Accept"] == "image/*"


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/",
        "https://127.0.0.1/",
        "https://[::ffff:7f00:1]/",
        "file:///etc/passwd",
        "http://cdn.example.com/x.png",  # downgrade to http
        "https://user@cdn.example.com/x.png",
    ],
)
@responses.activate
def test_redirect_target_rechecked(location: str) -> None:
    responses.get("https://cdn.example.com/a", status=307, headers={"Location": location})
    with pytest.raises(DownloadRefused):
        safe_get(requests.Session(), "https://cdn.example.com/a", NetPolicy(max_redirects=3))
    assert len(responses.calls) == 1


def test_refusal_wrapped_by_requests_is_unwrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    session = requests.Session()
    refusal = DownloadRefused("refused connection to cdn.example.com:443 at 127.0.0.1: loopback")

    def get(*args: Any, **kwargs: Any) -> Any:
        try:
            raise refusal
        except DownloadRefused as exc:
            raise requests.ConnectionError(exc) from exc

    monkeypatch.setattr(session, "get", get)
    with pytest.raises(DownloadRefused) as info:
        safe_get(session, "https://cdn.example.com/x.png", NetPolicy())
    assert info.value is refusal

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise requests.ConnectTimeout("slow")

    monkeypatch.setattr(session, "get", fail)
    with pytest.raises(requests.ConnectTimeout):
        safe_get(session, "https://cdn.example.com/x.png", NetPolicy())
