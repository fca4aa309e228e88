"""capflow's own HTTP/1.1 client against servers that frame their answers in every legal way,
and what only it does (its connection pool). Each test runs a raw asyncio server on loopback.
What every transport must do, hostile servers included, is in test_transport_conformance.py."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest

from capflow.errors import ConfigError, ServingError
from capflow.serving._http_transport import HttpTransport
from capflow.serving.transport import TransportOptions

ANSWER = {"choices": [{"message": {"content": "a red square"}, "finish_reason": "stop"}]}
BODY = json.dumps(ANSWER).encode()
TEXT = "a red square"

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


def _serve(handler: Handler, client: Callable[[HttpTransport], Awaitable[object]],
           timeout: float = 5.0) -> tuple[object, dict[str, int]]:
    """Run ``handler`` as a server and ``client`` against it; returns the client's result and
    counts of connections and requests the server saw."""
    seen = {"connections": 0, "requests": 0}

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["connections"] += 1
        try:
            while True:
                try:
                    await _read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                seen["requests"] += 1
                await handler(reader, writer, seen["requests"])
                if writer.is_closing():
                    return
        finally:
            writer.close()

    async def main() -> object:
        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = HttpTransport(f"http://127.0.0.1:{port}/v1", "sk-test",
                                  TransportOptions(timeout=timeout, connections=8))
        try:
            return await client(transport)
        finally:
            await transport.close()
            server.close()

    return asyncio.run(main()), seen


def _answer(body: bytes = BODY, *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _twice(transport: HttpTransport) -> list[str]:
    return [(await transport.chat({"messages": []})).text,
            (await transport.chat({"messages": []})).text]


def test_keep_alive_connections_are_reused():
    async def handler(reader, writer, n):
        writer.write(_answer())

    result, seen = _serve(handler, _twice)
    assert result == [TEXT, TEXT]
    assert seen == {"connections": 1, "requests": 2}


def test_a_reset_is_left_to_the_engines_retries():
    async def handler(reader, writer, n):
        if n == 2:  # RST, not a clean close
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.write(_answer())

    async def client(transport):
        await transport.chat({"messages": []})
        with pytest.raises(ServingError) as caught:
            await transport.chat({"messages": []})
        return caught.value.kind

    kind, seen = _serve(handler, client)
    assert kind == "ConnectionError" and seen["requests"] == 2


def test_connection_close_answers_are_not_reused():
    async def handler(reader, writer, n):
        writer.write(_answer(BODY, "Connection: close"))
        await writer.drain()
        writer.close()

    result, seen = _serve(handler, _twice)
    assert result == [TEXT, TEXT]
    assert seen == {"connections": 2, "requests": 2}


def test_chunked_gzip_and_close_delimited_bodies_are_read():
    packed = gzip.compress(BODY)

    async def handler(reader, writer, n):
        if n == 1:  # chunked, in three pieces
            parts = [BODY[:10], BODY[10:30], BODY[30:]]
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
            writer.write(_answer(chunks, "Transfer-Encoding: chunked"))
        else:  # gzip, its length given by the connection's end
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nConnection: close\r\n\r\n"
                         + packed)
            await writer.drain()
            writer.close()

    result, _ = _serve(handler, _twice)
    assert result == [TEXT, TEXT]


def test_the_request_carries_the_key_the_path_and_the_body():
    got: list[bytes] = []

    async def on_connect(reader, writer):
        got.append(await _read_request(reader))
        writer.write(_answer())
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = HttpTransport(f"http://127.0.0.1:{port}/v1/", "sk-abc-123",
                                  TransportOptions(timeout=5.0, connections=4))
        try:
            await transport.chat({"model": "m", "messages": [{"role": "user", "content": "é"}]})
        finally:
            await transport.close()
            server.close()

    asyncio.run(main())
    head, body = got[0].split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    assert b"Authorization: Bearer sk-abc-123" in lines
    assert b"Content-Type: application/json" in lines
    assert json.loads(body) == {"model": "m", "messages": [{"role": "user", "content": "é"}]}


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"choi", "ConnectionError"),
        (b"this is not HTTP\r\n\r\n", "BadResponse"),
        (_answer(b"<html>busy</html>"), "BadResponse"),
    ],
    ids=["closed-mid-body", "not-http", "not-json"],
)
def test_broken_answers_are_serving_errors(reply, kind):
    async def handler(reader, writer, n):
        writer.write(reply)
        await writer.drain()
        writer.close()

    async def client(transport):
        with pytest.raises(ServingError) as caught:
            await transport.chat({"messages": []})
        return caught.value

    error, _ = _serve(handler, client)
    assert error.kind == kind
    assert error.transient


def test_a_stream_is_joined_from_its_events():
    events = [
        {"choices": [{"delta": {"content": "a red "}}]},
        {"choices": [{"delta": {"content": "square"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}},
    ]
    sse = b"".join(b"data: %s\n\n" % json.dumps(e).encode() for e in events) + b"data: [DONE]\n\n"

    async def handler(reader, writer, n):
        # Split mid-line, to be joined again by the reader.
        chunks = [sse[:17], sse[17:90], sse[90:]]
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        writer.write(_answer(body, "Content-Type: text/event-stream",
                             "Transfer-Encoding: chunked"))

    async def client(transport):
        return await transport.chat_stream({"messages": []})

    response, _ = _serve(handler, client)
    assert response.text == "a red square"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (12, 3)


def test_a_url_that_is_not_http_is_a_config_error():
    with pytest.raises(ConfigError, match="must be an http"):
        HttpTransport("ftp://example.org/v1", None, TransportOptions())


def test_a_proxy_that_applies_is_mentioned(monkeypatch, caplog):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example.org")
    with caplog.at_level(logging.WARNING, logger="capflow"):
        HttpTransport("https://api.example.org/v1", None, TransportOptions())  # no connection
        HttpTransport("https://internal.example.org/v1", None, TransportOptions())
        HttpTransport("http://127.0.0.1:9/v1", None, TransportOptions())  # HTTP_PROXY unset
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "serving.transport=auto" in warnings[0]


def test_interim_1xx_answers_are_skipped_and_answers_stay_with_their_requests():
    async def handler(reader, writer, n):
        body = json.dumps({"choices": [{"message": {"content": str(n)}}]}).encode()
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n" + _answer(body))

    async def client(transport):
        return [(await transport.chat({"messages": []})).text for _ in range(3)]

    result, seen = _serve(handler, client)
    assert result == ["1", "2", "3"]
    assert seen["connections"] == 1


def test_two_stale_connections_in_a_row_still_get_an_answer():
    # Both pooled connections are closed by the server when next used: the second try must
    # go to a new connection, not to the next stale one.
    per_connection: dict[int, int] = {}

    async def handler(reader, writer, n):
        per_connection[id(writer)] = per_connection.get(id(writer), 0) + 1
        if per_connection[id(writer)] > 1:  # every connection answers once only
            writer.close()
        else:
            writer.write(_answer())

    async def client(transport):
        await asyncio.gather(transport.chat({"messages": []}), transport.chat({"messages": []}))
        return (await transport.chat({"messages": []})).text

    result, seen = _serve(handler, client)
    assert result == TEXT
    assert seen == {"connections": 3, "requests": 4}


def test_a_gzipped_stream_is_decompressed():
    sse = (b'data: {"choices": [{"delta": {"content": "zipped"}, "finish_reason": "stop"}]}\n\n'
           b"data: [DONE]\n\n")
    packed = gzip.compress(sse)

    async def handler(reader, writer, n):
        chunks = [packed[:20], packed[20:]]
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        writer.write(_answer(body, "Content-Encoding: gzip", "Transfer-Encoding: chunked"))

    async def client(transport):
        return await transport.chat_stream({"messages": []})

    response, _ = _serve(handler, client)
    assert response.text == "zipped"


def test_malformed_stream_chunks_are_bad_responses():
    sse = b'data: {"choices": ["x"]}\n\ndata: [DONE]\n\n'

    async def handler(reader, writer, n):
        writer.write(_answer(sse, "Content-Type: text/event-stream"))

    async def client(transport):
        with pytest.raises(ServingError) as caught:
            await transport.chat_stream({"messages": []})
        return caught.value.kind

    kind, _ = _serve(handler, client)
    assert kind == "BadResponse"


def test_a_body_that_is_not_json_serialisable_is_a_bad_request():
    async def handler(reader, writer, n):
        writer.write(_answer())

    async def client(transport):
        with pytest.raises(ServingError) as caught:
            await transport.chat({"messages": [], "extra": object()})
        return caught.value

    error, seen = _serve(handler, client)
    assert error.kind == "BadRequest" and not error.transient
    assert seen["connections"] == 0


def test_a_reset_in_a_close_delimited_body_is_a_connection_error():
    async def handler(reader, writer, n):
        writer.write(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"choi')
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def client(transport):
        with pytest.raises(ServingError) as caught:
            await transport.chat({"messages": []})
        return caught.value.kind

    kind, _ = _serve(handler, client)
    assert kind == "ConnectionError"


def test_a_bad_port_is_a_config_error():
    with pytest.raises(ConfigError, match="bad port"):
        HttpTransport("http://127.0.0.1:99999/v1", None, TransportOptions())
