"""The client's errors: each names the request (method and URL) and what went wrong where."""

from __future__ import annotations


class HttpError(Exception):
    """A request that got no usable HTTP answer; ``request`` is ``METHOD URL``."""

    def __init__(self, request: str, what: str) -> None:
        super().__init__(f"{request}: {what}")
        self.request, self.what = request, what


class ConnectError(HttpError):
    """The connection (TCP, TLS, a proxy's tunnel) could not be set up, or broke before an answer."""


class CertificateError(ConnectError):
    """TLS verification of the server failed (unknown CA, wrong name); the message is OpenSSL's."""


class ProtocolError(HttpError):
    """The server's bytes are not HTTP/1.1: bad status line, bad chunk size, oversized headers, truncated body."""


class LineTooLong(ProtocolError):
    """A line of a line-delimited response (a watch event) exceeds the bound."""


class HttpTimeout(HttpError, TimeoutError):
    """No answer (or no more of it) in time; a ``TimeoutError`` too."""
