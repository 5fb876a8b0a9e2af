"""Which requests go through a proxy: HTTPS_PROXY / HTTP_PROXY / NO_PROXY read as Go's net/http reads them."""

from __future__ import annotations

import pytest

from agent.http.proxy import Proxies, Proxy, ProxyConfigError


def test_variables_upper_case_first_then_lower_case() -> None:
    proxies = Proxies.from_environ({"https_proxy": "http://low:1", "HTTPS_PROXY": "http://up:2", "http_proxy": "h:3",
                                    "no_proxy": "internal"})
    assert proxies == Proxies("http://up:2", "h:3", "internal")
    assert proxies.for_url("https", "api.example", 443) == Proxy("up", 2, None, "HTTPS_PROXY")
    assert proxies.for_url("http", "api.example", 80) == Proxy("h", 3, None, "HTTP_PROXY")  # no scheme: http
    assert Proxies.from_environ({}).for_url("https", "api.example", 443) is None


@pytest.mark.parametrize(("no_proxy", "host", "port", "direct"), [
    ("*", "anything", 443, True),
    ("example.com", "example.com", 443, True),
    ("example.com", "api.example.com", 443, True),
    (".example.com", "example.com", 443, False),  # a leading dot: subdomains only
    (".example.com", "api.example.com", 443, True),
    ("example.com", "notexample.com", 443, False),
    ("example.com:6443", "api.example.com", 6443, True),
    ("example.com:6443", "api.example.com", 443, False),
    ("10.96.0.0/12, 127.0.0.1", "10.96.0.1", 443, True),
    ("10.96.0.0/12", "10.112.0.1", 443, False),
    ("127.0.0.1", "127.0.0.1", 6443, True),
    ("::1", "::1", 443, True),
    ("[fd00::]:443", "fd00::", 443, True),
    ("fd00::/8", "fd12::1", 443, True),
    ("example.com", "10.0.0.1", 443, False),
    ("", "example.com", 443, False),
])
def test_no_proxy(no_proxy: str, host: str, port: int, direct: bool) -> None:
    proxies = Proxies(https="http://proxy:3128", no_proxy=no_proxy)
    assert (proxies.for_url("https", host, port) is None) is direct


def test_credentials_and_unsupported_proxies() -> None:
    proxy = Proxies(https="http://us%40er:p%3Ass@proxy:3128").for_url("https", "api", 443)
    assert proxy is not None and proxy.authorization == "Basic dXNAZXI6cDpzcw=="  # base64 of "us@er:p:ss"
    with pytest.raises(ProxyConfigError, match=r"^\$HTTPS_PROXY='socks5://p:1080': only http:// proxies"):
        Proxies(https="socks5://p:1080").for_url("https", "api", 443)
    with pytest.raises(ProxyConfigError, match=r"^\$HTTP_PROXY='http://p:port': bad port"):
        Proxies(http="http://p:port").for_url("http", "api", 80)
