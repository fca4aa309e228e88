"""Downloading an image under one total deadline, with a bounded size and few redirects.

``urllib``'s ``timeout`` bounds each socket operation, not the download: a server that sends a
byte a second (in its headers or its body) keeps one going for hours, and the host name's
lookup is not bounded at all. Here every blocking step gets only the time left of
``timeout`` seconds: the lookup runs in a helper thread that is abandoned when the time is up,
connecting and the TLS handshake get the time left as their socket timeout, and every read of
the answer (status line, headers, body) checks the clock and waits at most the time left.

urllib still does the rest, as before: HTTP proxies from the environment, the CONNECT tunnel
for https through a proxy, HTTP errors, and redirects (at most ``MAX_REDIRECTS``, to http(s)
only). Nothing capflow knows is ever sent: no API key, no Authorization header, no cookies;
a URL carrying ``user:password@`` is refused rather than have its password sent.
"""

from __future__ import annotations

import functools
import http.client
import io
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

MAX_REDIRECTS = 5
_SCHEMES = ("http", "https")


class FetchError(Exception):
    """A download failed; the message says why (without the URL, which the caller adds).

    :param kind: ``"failed"``, ``"timeout"`` (the deadline passed) or ``"too_large"``.
    """

    def __init__(self, message: str, kind: str = "failed") -> None:
        super().__init__(message)
        self.kind = kind


class DeadlineExceeded(TimeoutError):
    """The download's total time is up."""


def fetch(url: str, timeout: float, max_bytes: int) -> bytes:
    """The body of ``url``: at most ``max_bytes`` bytes, within ``timeout`` seconds in all.

    :raises FetchError: the download failed, took too long, or is larger than ``max_bytes``
        (its ``kind`` says which).
    """
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise FetchError(f"not an http(s) URL: {url[:60]}")
    if parts.username is not None or parts.password is not None:
        raise FetchError("the URL carries credentials (user:password@), which capflow never sends")
    deadline = _Deadline(timeout)
    opener = _opener(deadline)
    try:
        with opener.open(url) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:  # refused before any of it is read
                raise FetchError(f"Content-Length is {length} bytes", "too_large")
            data = response.read(max_bytes + 1)
    except FetchError:
        raise
    except urllib.error.HTTPError as exc:
        exc.close()
        raise FetchError(f"HTTP {exc.code} {exc.reason}") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)  # a URLError wraps the socket's error
        if deadline.expired() or isinstance(reason, DeadlineExceeded):
            raise FetchError(f"took more than {timeout:g} s", "timeout") from None
        raise FetchError(str(reason) or type(reason).__name__) from None
    if len(data) > max_bytes:
        raise FetchError("", "too_large")  # nothing to add: the caller names the limit
    return data


class _Deadline:
    """The end of one download, shared by its connections (one per redirect)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def left(self) -> float:
        """Seconds left; raises ``DeadlineExceeded`` when none are."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"took more than {self.seconds:g} s")
        return left

    def connect(self, address: tuple[str, int], timeout: object = None,
                source_address: tuple[str, int] | None = None) -> socket.socket:
        """``socket.create_connection`` within the deadline (``timeout`` is ignored)."""
        host, port = address
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in _resolve(host, port, self):
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(self.left())
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                sock.settimeout(self.left())  # what follows (TLS, the request) gets the rest
                return sock
            except OSError as exc:
                sock.close()
                if isinstance(exc, DeadlineExceeded) or self.expired():
                    raise DeadlineExceeded(f"took more than {self.seconds:g} s") from None
                error = exc
        raise error or OSError(f"no address for {host}")


def _resolve(host: str, port: int, deadline: _Deadline) -> list[Any]:
    """``getaddrinfo`` within the deadline: a hung lookup is left to finish on its own."""
    try:  # an address literal needs no lookup
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        pass
    found: list[Any] = []
    done = threading.Event()

    def look_up() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            found.append(exc)
        finally:
            done.set()

    # A daemon thread: the C lookup cannot be interrupted, and must not keep the process alive.
    threading.Thread(target=look_up, name="capflow-fetch-dns", daemon=True).start()
    if not done.wait(deadline.left()):
        raise DeadlineExceeded(f"looking up {host} took more than {deadline.seconds:g} s")
    result = found[0]
    if isinstance(result, BaseException):
        raise result
    return result


class _DeadlineReader(io.RawIOBase):
    """The answer's byte stream: each read waits at most the time left, and none starts after
    the deadline, however little each read brings (one byte a second is refused too)."""

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, deadline: _Deadline) -> None:
        super().__init__()
        self._raw, self._sock, self._deadline = raw, sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(self._deadline.left())
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()  # releases the socket, as http.client's own reader does
        super().close()


class _Response(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, debuglevel: int = 0, method: str | None = None,
                 url: str | None = None, *, deadline: _Deadline) -> None:
        super().__init__(sock, debuglevel, method, url)
        # The same socket reader, behind the deadline (detach: closing the old buffer would
        # close it).
        raw = self.fp.detach()
        self.fp = io.BufferedReader(_DeadlineReader(raw, sock, deadline))


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int | None = None, timeout: object = None, *,
                 deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(host, port, timeout=deadline.left(), **kwargs)
        self._create_connection = deadline.connect
        # http.client only calls response_class; typeshed declares it a class, not a callable.
        self.response_class = functools.partial(  # type: ignore[assignment]
            _Response, deadline=deadline)


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int | None = None, timeout: object = None, *,
                 deadline: _Deadline, **kwargs: Any) -> None:
        self._tls: ssl.SSLContext = kwargs.get("context") or _tls_context()
        kwargs["context"] = self._tls
        super().__init__(host, port, timeout=deadline.left(), **kwargs)
        self._deadline = deadline
        self._create_connection = deadline.connect
        # http.client only calls response_class; typeshed declares it a class, not a callable.
        self.response_class = functools.partial(  # type: ignore[assignment]
            _Response, deadline=deadline)

    def connect(self) -> None:
        # HTTPSConnection.connect, with the handshake given only the time left after the
        # connection (and a proxy's tunnel) took theirs.
        http.client.HTTPConnection.connect(self)
        assert self.sock is not None
        self.sock.settimeout(self._deadline.left())
        # _tunnel_host: set by set_tunnel() (a proxy), a private attribute typeshed leaves out.
        server_hostname = self._tunnel_host or self.host  # type: ignore[attr-defined]
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=server_hostname)


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """One verifying context for every download (loading the CA store takes milliseconds)."""
    return ssl.create_default_context()


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._connection = functools.partial(_HTTPConnection, deadline=deadline)

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._connection = functools.partial(_HTTPSConnection, deadline=deadline)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows at most ``MAX_REDIRECTS`` redirects in all, to http(s) URLs only."""

    def __init__(self) -> None:
        super().__init__()
        self.followed = 0

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        target = urlsplit(newurl)  # urllib made it absolute
        problem = None
        if target.scheme not in _SCHEMES:
            problem = f"redirected to a {target.scheme} URL, not http(s)"
        elif target.username is not None or target.password is not None:
            problem = "redirected to a URL carrying credentials"
        elif self.followed >= MAX_REDIRECTS:
            problem = f"more than {MAX_REDIRECTS} redirects"
        if problem:
            fp.close()
            raise FetchError(problem)
        self.followed += 1
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            # A proxy's credentials go to the proxy: the proxy handler adds them again when
            # the next host is reached through it, and a host that is not must not see them.
            for name in ("Proxy-authorization", "Authorization", "Cookie"):
                new.headers.pop(name, None)
        return new


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """urllib's usual opener, minus ftp, file and data URLs, with this download's deadline."""
    opener = urllib.request.OpenerDirector()
    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        _HTTPHandler(deadline),
        _HTTPSHandler(deadline),
        urllib.request.HTTPDefaultErrorHandler(),
        _Redirects(),
        urllib.request.HTTPErrorProcessor(),
    ]
    for handler in handlers:
        opener.add_handler(handler)
    opener.addheaders = [("User-Agent", "capflow")]
    return opener
