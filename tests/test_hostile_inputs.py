"""Hostile image files and URLs cannot hang a run; SIGINT and SIGTERM always end one promptly.

Everything here is real: FIFOs, sockets and device files on disk, a loopback HTTP server that
drips its answer a byte at a time or never answers, and the real ``capflow`` console script
against the loopback fake OpenAI server.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import socketserver
import sqlite3
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CAPFLOW, expected_caption, make_dataset, make_image, read_rows, run_capflow
from PIL import Image

from capflow.errors import RowError
from capflow.images import ImagePreparer
from capflow.testing.server import describe_image

# --------------------------------------------------------------------------- helpers


def _within(seconds: float, call: Callable[[], Any]) -> Any:
    """``call()``, or a test failure (not a hung test run) when it takes over ``seconds``."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(("ok", call()))
        except BaseException as exc:  # handed back to the test
            outcome.append(("raised", exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        pytest.fail(f"still blocked after {seconds} s")
    kind, value = outcome[0]
    if kind == "raised":
        raise value
    return value


def _row_error(call: Callable[[], Any], seconds: float = 5.0) -> RowError:
    with pytest.raises(RowError) as caught:
        _within(seconds, call)
    return caught.value


def _noisy_png(path: Path, side: int = 64) -> int:
    """A PNG that compresses badly (a few KB for 64x64); returns its size in bytes."""
    Image.effect_noise((side, side), 100).convert("RGB").save(path, "PNG")
    return path.stat().st_size


def _socket_file(path: Path) -> socket.socket:
    """A Unix socket bound at ``path`` (bound from its folder: socket paths are short)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    here = os.getcwd()
    os.chdir(path.parent)
    try:
        sock.bind(path.name)
    finally:
        os.chdir(here)
    return sock


class _WebHandler(socketserver.BaseRequestHandler):
    """Answers by path: ``/img/NAME`` an image, ``/drip`` a body of a byte a second,
    ``/drip-head`` a status line and headers of a byte a second, ``/hang`` nothing at all,
    ``/redirect/N`` N redirects before an image, ``/to/URL`` a redirect to URL, ``/big`` a
    Content-Length over any limit."""

    server: _Web

    def handle(self) -> None:
        web = self.server
        data = b""
        self.request.settimeout(5)
        try:
            if web.tls is not None:
                self.request.do_handshake()
            while b"\r\n\r\n" not in data:
                chunk = self.request.recv(4096)
                if not chunk:
                    return
                data += chunk
        except OSError:
            return
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        path = head[0].split(" ")[1]
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in head[1:])}
        with web.lock:
            web.seen.append((path, headers))
        with contextlib.suppress(OSError):  # the client gave up: the point of most of these
            self.answer(path)

    def answer(self, path: str) -> None:
        web, sock = self.server, self.request
        if path.startswith("/img/"):
            body = web.images[path[5:]]
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        elif path == "/drip":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            self.drip(b"\x89PNG\r\n\x1a\n" + bytes(100_000))
        elif path == "/drip-head":
            self.drip(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 100_000 + b"\r\n\r\n")
        elif path == "/hang":
            web.closing.wait()
        elif path.startswith("/redirect/"):
            left = int(path.rsplit("/", 1)[1])
            where = f"/redirect/{left - 1}" if left > 1 else "/img/good.png"
            sock.sendall(f"HTTP/1.1 302 Found\r\nLocation: {where}\r\nContent-Length: 0\r\n"
                         "Connection: close\r\n\r\n".encode())
        elif path.startswith("/to/"):
            where = path[4:]
            sock.sendall(f"HTTP/1.1 302 Found\r\nLocation: {where}\r\nContent-Length: 0\r\n"
                         "Connection: close\r\n\r\n".encode())
        elif path == "/big":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n")
            web.closing.wait()
        else:
            sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    def drip(self, payload: bytes) -> None:
        for i in range(len(payload)):
            self.request.sendall(payload[i:i + 1])
            if self.server.closing.wait(self.server.drip_every):
                return


class _Web(socketserver.ThreadingTCPServer):
    """A loopback HTTP server that serves images, or misbehaves, by path."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, drip_every: float = 1.0, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _WebHandler)
        self.drip_every = drip_every
        self.tls = tls
        self.images: dict[str, bytes] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.closing = threading.Event()

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        if self.tls is not None:  # the handshake happens in the handler's own thread
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.server_address[1]}"

    def paths(self) -> list[str]:
        with self.lock:
            return [path for path, _ in self.seen]


def _serve(server: _Web) -> Iterator[_Web]:
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.closing.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def web() -> Iterator[_Web]:
    yield from _serve(_Web())


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> Path:
    """A self-signed certificate (and its key) for 127.0.0.1."""
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is not installed (needed to make a test certificate)")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
        check=True, capture_output=True, timeout=60,
    )
    return folder


@pytest.fixture
def tls_web(certificate) -> Iterator[_Web]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate / "cert.pem", certificate / "key.pem")
    yield from _serve(_Web(tls=context))


@pytest.fixture
def trust_test_certificate(certificate, monkeypatch) -> None:
    """Downloads trust the test certificate (only)."""
    import capflow.fetch

    context = ssl.create_default_context(cafile=str(certificate / "cert.pem"))
    monkeypatch.setattr(capflow.fetch, "_tls_context", lambda: context)


# --------------------------------------------------------------------------- files


def test_a_fifo_is_refused_before_anything_could_wait_for_a_writer(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    err = _row_error(lambda: ImagePreparer().prepare("pipe.png", tmp_path))
    assert err.kind == "ImageUnreadable"
    assert str(err) == f"image path is not a regular file (a FIFO): {tmp_path / 'pipe.png'}"


def test_a_fifo_that_takes_a_files_place_is_opened_without_blocking_and_refused(
    tmp_path, monkeypatch
):
    # The path is checked (lstat) and then opened: a FIFO swapped in between must not block
    # the open (O_NONBLOCK) and is refused by the fstat of the open descriptor.
    make_image(tmp_path / "good.png", 1)
    os.mkfifo(tmp_path / "pipe.png")
    real_lstat = os.lstat
    looks_regular = real_lstat(tmp_path / "good.png")
    monkeypatch.setattr(os, "lstat", lambda p, *a, **k: looks_regular
                        if str(p).endswith("pipe.png") else real_lstat(p, *a, **k))
    err = _row_error(lambda: ImagePreparer().prepare("pipe.png", tmp_path))
    assert err.kind == "ImageUnreadable" and "not a regular file (a FIFO)" in str(err)


def test_a_socket_and_a_folder_are_refused(tmp_path):
    with _socket_file(tmp_path / "sock.png"):
        err = _row_error(lambda: ImagePreparer().prepare("sock.png", tmp_path))
    assert err.kind == "ImageUnreadable" and "not a regular file (a socket)" in str(err)
    (tmp_path / "dir.png").mkdir()
    err = _row_error(lambda: ImagePreparer().prepare("dir.png", tmp_path))
    assert err.kind == "ImageUnreadable" and "not a regular file (a folder)" in str(err)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero on this system")
def test_a_device_is_refused_where_the_root_allows_it_and_outside_the_root_otherwise(tmp_path):
    # A link to a device leads out of the dataset's folder: refused as outside the root. With
    # image.image_root=/ it is allowed there, and refused as a device, unread (reading
    # /dev/zero never ends).
    os.symlink("/dev/zero", tmp_path / "zero.png")
    err = _row_error(lambda: ImagePreparer().prepare("zero.png", tmp_path))
    assert err.kind == "ImageOutsideRoot"
    err = _row_error(lambda: ImagePreparer(image_root="/").prepare("zero.png", tmp_path))
    assert err.kind == "ImageUnreadable"
    assert str(err) == f"image path is not a regular file (a character device): {tmp_path}/zero.png"


def test_a_file_over_max_file_bytes_is_refused_from_its_size_before_it_is_read(
    tmp_path, monkeypatch
):
    size = _noisy_png(tmp_path / "big.png")
    assert ImagePreparer(max_file_bytes=size).prepare("big.png", tmp_path).size == size
    assert ImagePreparer(max_file_bytes=None).prepare("big.png", tmp_path).size == size

    def no_reading(*args: object) -> bytes:
        raise AssertionError("the file was read")

    monkeypatch.setattr(os, "read", no_reading)
    err = _row_error(lambda: ImagePreparer(max_file_bytes=size - 1).prepare("big.png", tmp_path))
    assert err.kind == "ImageTooLarge"
    assert str(err) == (f"image file is {size} bytes, more than image.max_file_bytes={size - 1}:"
                        f" {tmp_path / 'big.png'}")


def test_a_data_uri_over_max_file_bytes_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    size = _noisy_png(tmp_path / "big.png")
    uri = "data:image/png;base64," + base64.b64encode((tmp_path / "big.png").read_bytes()).decode()
    assert ImagePreparer(max_file_bytes=size).prepare(uri, tmp_path).size == size

    def no_decoding(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the data URI was decoded")

    monkeypatch.setattr(base64, "b64decode", no_decoding)
    err = _row_error(lambda: ImagePreparer(max_file_bytes=size - 1).prepare(uri, tmp_path))
    assert err.kind == "ImageTooLarge"
    assert f"data URI holds {size} bytes, more than image.max_file_bytes={size - 1}" in str(err)


def test_an_image_costs_one_lstat_one_open_one_fstat_and_one_read(tmp_path, monkeypatch):
    make_image(tmp_path / "a.png", 1)
    preparer = ImagePreparer()
    preparer.prepare("a.png", tmp_path)  # the folder's real path is cached from here on
    calls: list[str] = []
    for name in ("lstat", "stat", "open", "fstat", "read"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, _name=name, **k: (
            calls.append(_name), _real(*a, **k))[1])
    preparer.prepare("a.png", tmp_path)
    monkeypatch.undo()
    assert calls == ["lstat", "open", "fstat", "read"]


# --------------------------------------------------------------------------- downloads


def _fetcher(timeout: float = 10.0, max_bytes: int = 20_000_000) -> ImagePreparer:
    return ImagePreparer(fetch_urls=True, fetch_timeout=timeout, fetch_max_bytes=max_bytes)


@pytest.mark.parametrize("path", ["/drip", "/drip-head", "/hang"])
def test_fetch_timeout_bounds_the_whole_download(web, tmp_path, path):
    # A byte a second, in the body or in the headers, or no answer at all: each read is
    # quick, but the download as a whole ends at fetch_timeout.
    began = time.monotonic()
    err = _row_error(lambda: _fetcher(timeout=2).prepare(web.url + path, tmp_path), seconds=10)
    took = time.monotonic() - began
    assert err.kind == "ImageFetchFailed"
    assert "took more than 2 s (image.fetch_timeout=2)" in str(err)
    assert 1.9 <= took < 3.0, took


@pytest.mark.parametrize("path", ["/drip", "/drip-head", "/hang"])
def test_fetch_timeout_bounds_an_https_download_too(tls_web, trust_test_certificate, tmp_path,
                                                    path):
    began = time.monotonic()
    err = _row_error(lambda: _fetcher(timeout=1.2).prepare(tls_web.url + path, tmp_path),
                     seconds=10)
    assert err.kind == "ImageFetchFailed" and "took more than 1.2 s" in str(err)
    assert 1.1 <= time.monotonic() - began < 2.2


def test_https_downloads_are_verified(tls_web, certificate, monkeypatch, tmp_path):
    tls_web.images["good.png"] = good = make_image(tmp_path / "good.png", 3)
    url = f"{tls_web.url}/img/good.png"
    err = _row_error(lambda: _fetcher().prepare(url, tmp_path))  # the system's CAs only
    assert err.kind == "ImageFetchFailed" and "CERTIFICATE_VERIFY_FAILED" in str(err)
    import capflow.fetch

    context = ssl.create_default_context(cafile=str(certificate / "cert.pem"))
    monkeypatch.setattr(capflow.fetch, "_tls_context", lambda: context)
    prepared = _fetcher().prepare(url, tmp_path)
    assert base64.b64decode(prepared.url.split(",", 1)[1]) == good


def test_a_tls_handshake_that_never_ends_counts_against_fetch_timeout(web, tmp_path):
    # An https URL to a plain HTTP server that waits for a request: the handshake hangs.
    url = web.url.replace("http://", "https://") + "/hang"
    began = time.monotonic()
    err = _row_error(lambda: _fetcher(timeout=1).prepare(url, tmp_path))
    assert err.kind == "ImageFetchFailed" and "took more than 1 s" in str(err)
    assert time.monotonic() - began < 2


def test_a_slow_host_name_lookup_counts_against_fetch_timeout(tmp_path, monkeypatch):
    # The lookup is a C call that cannot be interrupted; it is left behind, not waited for.
    # (Patched: the name never reaches a real resolver.)
    def slow_lookup(*args: Any, **kwargs: Any) -> list:
        numeric = kwargs.get("flags", 0) & socket.AI_NUMERICHOST  # answered at once
        if args[0] == "slow.invalid" and not numeric:
            time.sleep(5)
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return real_lookup(*args, **kwargs)

    real_lookup = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", slow_lookup)
    began = time.monotonic()
    err = _row_error(lambda: _fetcher(timeout=1).prepare("http://slow.invalid/x.png", tmp_path))
    assert err.kind == "ImageFetchFailed" and "took more than 1 s" in str(err)
    assert time.monotonic() - began < 2


def test_redirects_at_most_five_and_only_to_http(web, tmp_path):
    good = make_image(tmp_path / "good.png", 7)
    web.images["good.png"] = good
    prepared = _fetcher().prepare(f"{web.url}/redirect/5", tmp_path)
    assert base64.b64decode(prepared.url.split(",", 1)[1]) == good
    err = _row_error(lambda: _fetcher().prepare(f"{web.url}/redirect/6", tmp_path))
    assert err.kind == "ImageFetchFailed" and "more than 5 redirects" in str(err)
    assert web.paths().count("/img/good.png") == 1  # the sixth redirect was not followed
    for target in ("file:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1/x"):
        err = _row_error(lambda t=target: _fetcher().prepare(f"{web.url}/to/{t}", tmp_path))
        assert err.kind == "ImageFetchFailed", target


def test_a_url_with_credentials_is_refused_unsent(web, tmp_path):
    url = web.url.replace("http://", "http://user:secret@") + "/img/good.png"
    err = _row_error(lambda: _fetcher().prepare(url, tmp_path))
    assert err.kind == "ImageFetchFailed" and "credentials" in str(err)
    assert web.seen == []


def test_a_download_announced_over_the_limit_is_refused_before_its_body(web, tmp_path):
    began = time.monotonic()
    err = _row_error(lambda: _fetcher(timeout=30, max_bytes=1000).prepare(web.url + "/big",
                                                                         tmp_path))
    assert err.kind == "ImageTooLarge" and "image.fetch_max_bytes=1000" in str(err)
    assert time.monotonic() - began < 2  # not read until the body (which never comes) ends


# --------------------------------------------------------------------------- end to end


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero on this system")
def test_hostile_rows_fail_alone_and_the_run_ends_normally(server, web, tmp_path):
    root = tmp_path / "data"
    data, rows = make_dataset(root, 4)
    images = root / "images"
    os.mkfifo(images / "pipe.png")
    sock = _socket_file(images / "sock.png")
    os.symlink("/dev/zero", images / "zero.png")  # allowed by image_root=/ below
    big = _noisy_png(images / "big.png")
    encoded = base64.b64encode((images / "big.png").read_bytes()).decode()
    big_uri = f"data:image/png;base64,{encoded}"
    web.images["good.png"] = fetched = make_image(tmp_path / "web.png", 9)
    hostile = {
        "fifo": ("./images/pipe.png", "ImageUnreadable", "not a regular file (a FIFO)"),
        "socket": ("./images/sock.png", "ImageUnreadable", "not a regular file (a socket)"),
        "device": ("./images/zero.png", "ImageUnreadable",
                   "not a regular file (a character device)"),
        "big": ("./images/big.png", "ImageTooLarge", "image.max_file_bytes=2000"),
        "big-uri": (big_uri, "ImageTooLarge", "image.max_file_bytes=2000"),
        "drip": (f"{web.url}/drip", "ImageFetchFailed", "image.fetch_timeout=2"),
    }
    assert big > 2000
    rows += [{"id": name, "image": [ref]} for name, (ref, _, _) in hostile.items()]
    rows.append({"id": "fetched", "image": [f"{web.url}/img/good.png"]})
    data.write_text(json.dumps(rows))
    out = tmp_path / "out.jsonl"
    began = time.monotonic()
    with sock:
        result = run_capflow(
            f"input={data}", f"output={out}", f"api_url={server.base_url}", "model_name=m",
            "image.image_root=/", "image.max_file_bytes=2000", "image.fetch_urls=true",
            "image.fetch_timeout=2", cwd=tmp_path, env={"CAPFLOW_API_KEY": "sk-capflow-secret"},
            timeout=60,
        )
    took = time.monotonic() - began
    assert result.returncode == 1, result.stdout + result.stderr  # rows failed; nothing else
    assert "capflow finished" in result.stdout
    written = {r["id"]: r for r in read_rows(out)}
    assert len(written) == len(rows)
    for name, (_, kind, message) in hostile.items():
        error = written[name]["_error"]
        assert error["type"] == kind and message in error["message"], (name, error)
    for i in range(4):
        assert written[f"{i:04d}"]["caption"] == expected_caption(images / f"{i:05d}.png")
    assert written["fetched"]["caption"] == describe_image(fetched)  # downloads still work
    assert len(server.requests) == 5  # the good rows only: hostile ones cost no request
    assert took < 20
    # The image host saw capflow's downloads, and never its API key.
    assert set(web.paths()) == {"/drip", "/img/good.png"}
    for _, headers in web.seen:
        assert "authorization" not in headers and "cookie" not in headers
        assert not any("sk-capflow-secret" in v for v in headers.values())


def _journal_rows(journal: Path) -> int:
    try:
        with sqlite3.connect(journal, timeout=0.2) as db:
            return db.execute("SELECT count(*) FROM rows").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_a_run_within_5_s_though_a_download_hangs(server, web, tmp_path, sig):
    quick = 30
    data, rows = make_dataset(tmp_path, quick)
    stuck = {"id": "stuck", "image": [f"{web.url}/hang"]}
    data.write_text(json.dumps(rows[:5] + [stuck] + rows[5:]))
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    proc = subprocess.Popen(
        [CAPFLOW, f"input={data}", f"output={out}", f"api_url={server.base_url}",
         "model_name=m", "image.fetch_urls=true", "image.fetch_timeout=600", "progress=false"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        journal = Path(f"{out}.journal.sqlite")
        deadline = time.monotonic() + 30
        while _journal_rows(journal) < quick or "/hang" not in web.paths():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the quick rows did not finish"
            time.sleep(0.05)
        time.sleep(0.2)  # the row is stuck in its download, not merely started
        sent = time.monotonic()
        proc.send_signal(sig)
        try:
            stdout, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"capflow still runs 10 s after {sig.name}")
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert took < 5, f"{took:.1f} s after the signal"
    assert proc.returncode == 130, stdout + stderr
    assert "capflow stopped" in stdout and "  rows " in stdout, stdout
    written = read_rows(out)
    assert sorted(r["id"] for r in written) == sorted(r["id"] for r in rows)
    by_id = {r["id"]: r for r in written}
    for i in range(quick):
        assert by_id[f"{i:04d}"]["caption"] == expected_caption(tmp_path / f"images/{i:05d}.png")
