"""One conformance suite that every transport passes (``http``, ``aiohttp``, ``sdk``), streaming
on and off where it matters: the same answers, the same limits and the same error kinds, against
real loopback servers that misbehave on purpose (``capflow.testing.hostile``), real TLS with a
private CA (``trustme``), and the fake OpenAI server's injected faults."""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
import subprocess
import sys
import time
from email.utils import format_datetime
from typing import Any

import pytest
import trustme

from capflow.errors import ConfigError, ServingError
from capflow.request import Response, Usage
from capflow.serving import OpenAIServing
from capflow.serving._aiohttp_transport import AiohttpTransport
from capflow.serving._http_transport import HttpTransport
from capflow.serving._sdk_transport import SDKTransport
from capflow.serving.ratelimit_headers import RateLimitInfo
from capflow.serving.transport import TransportOptions
from capflow.testing.faults import FaultConfig
from capflow.testing.hostile import ESCAPES, HostileServer
from capflow.testing.server import FakeOpenAIServer

KEY = "sk-conformance-0123456789abcdef"
BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
TRANSPORTS = {"http": HttpTransport, "aiohttp": AiohttpTransport, "sdk": SDKTransport}
RATE_HEADERS = ["x-ratelimit-limit-requests: 500", "x-ratelimit-remaining-requests: 499",
                "x-ratelimit-reset-requests: 120ms", "x-ratelimit-limit-tokens: 30000",
                "x-ratelimit-remaining-tokens: 29000", "x-ratelimit-reset-tokens: 2s"]
RATE_INFO = RateLimitInfo(500, 499, 0.12, 30000, 29000, 2.0)

Result = Response | ServingError


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every server here is on loopback: a proxy from the environment must not get in."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture(params=list(TRANSPORTS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=[False, True], ids=["plain", "stream"])
def stream(request: pytest.FixtureRequest) -> bool:
    return request.param


@pytest.fixture
def server() -> Any:
    with HostileServer() as srv:
        yield srv


def run(kind: str, url: str, *, stream: bool = False, calls: int = 1, pause: float = 0.0,
        key: str | None = KEY, **options: Any) -> list[Result]:
    """Send ``calls`` chat requests, one after the other, over one transport."""
    options.setdefault("timeout", 5.0)

    async def main() -> list[Result]:
        transport = TRANSPORTS[kind](url, key, TransportOptions(**options))
        results: list[Result] = []
        try:
            for n in range(calls):
                if n and pause:
                    await asyncio.sleep(pause)
                try:
                    send = transport.chat_stream if stream else transport.chat
                    results.append(await send(BODY))
                except ServingError as exc:
                    results.append(exc)
        finally:
            await transport.close()
        return results

    return asyncio.run(main())


def answer_of(kind: str, url: str, **kw: Any) -> Response:
    result = run(kind, url, **kw)[0]
    assert isinstance(result, Response), result
    return result


def failure_of(kind: str, url: str, **kw: Any) -> ServingError:
    result = run(kind, url, **kw)[0]
    assert isinstance(result, ServingError), result
    return result


# Answers


def test_a_good_answer(kind, stream, server):
    server.behave("answer", gzip=True)
    response = answer_of(kind, server.base_url, stream=stream)
    assert response == Response("a red square", Usage(7, 3), "stop", "hostile-model")
    assert server.seen[0]["authorization"] == f"Bearer {KEY}"


def test_content_parts_are_joined_and_refusal_parts_set_aside(kind, stream, server):
    parts = [{"type": "text", "text": "a red "}, {"type": "image_url", "image_url": {}},
             {"type": "output_text", "text": "square"}, {"type": "refusal", "refusal": "no"}]
    server.behave("answer", content=parts)
    response = answer_of(kind, server.base_url, stream=stream)
    assert (response.text, response.refusal) == ("a red square", "no")


def test_a_refusal_is_kept(kind, stream, server):
    server.behave("answer", content=None, refusal="I can't help with that")
    response = answer_of(kind, server.base_url, stream=stream)
    assert (response.text, response.refusal) == ("", "I can't help with that")


def test_finish_reason_passes_through_and_no_usage_is_zero(kind, stream, server):
    server.behave("answer", finish_reason="length", usage=False)
    response = answer_of(kind, server.base_url, stream=stream)
    assert (response.finish_reason, response.usage) == ("length", Usage(0, 0))


def test_an_empty_answer_is_empty_text_not_an_error(kind, stream, server):
    server.behave("answer", content="")
    response = answer_of(kind, server.base_url, stream=stream)
    assert (response.text, response.finish_reason) == ("", "stop")


def test_the_key_in_an_answer_is_redacted_but_line_breaks_stay(kind, stream, server):
    server.behave("answer", content=f"line one\nthe key is {KEY}")
    response = answer_of(kind, server.base_url, stream=stream)
    assert response.text == "line one\nthe key is [redacted]"


def test_a_stream_ends_at_done_even_if_its_body_does_not(kind, server):
    server.behave("answer", hold=True)
    started = time.monotonic()
    response = answer_of(kind, server.base_url, stream=True, timeout=3)
    assert response.text == "a red square" and time.monotonic() - started < 2


def test_a_200_with_an_error_body_is_a_transient_server_error(kind, server):
    server.behave("answer", body={"error": {"message": "model overloaded \x1b[2J"}})
    error = failure_of(kind, server.base_url)
    assert (error.kind, error.transient) == ("ServerError", True)
    assert "model overloaded" in str(error) and "\x1b" not in str(error)


def test_rate_limit_headers_come_with_every_answer(kind, stream, server):
    server.behave("answer", headers=RATE_HEADERS)
    assert answer_of(kind, server.base_url, stream=stream).rate_limits == RATE_INFO


def test_list_models(kind, server):
    server.behave("models", ids=["only-model"])

    async def main() -> list[str]:
        transport = TRANSPORTS[kind](server.base_url, KEY, TransportOptions(timeout=5))
        try:
            return await transport.list_models()
        finally:
            await transport.close()

    assert asyncio.run(main()) == ["only-model"]


# Error statuses and what they carry


def test_a_429_carries_retry_after_ms_and_the_rate_limits(kind, stream, server):
    server.behave("error", status=429, message="slow down",
                  headers=["retry-after-ms: 1500", "Retry-After: 9", *RATE_HEADERS])
    error = failure_of(kind, server.base_url, stream=stream)
    assert (error.kind, error.transient, error.status) == ("RateLimited", True, 429)
    assert error.retry_after == 1.5 and error.rate_limits == RATE_INFO
    assert "slow down" in str(error)


def test_retry_after_may_be_an_http_date(kind, server):
    when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=30)
    server.behave("error", status=503, headers=[f"Retry-After: {format_datetime(when, True)}"])
    error = failure_of(kind, server.base_url)
    assert (error.kind, error.transient) == ("ServerError", True)
    assert 25 <= error.retry_after <= 30


def test_insufficient_quota_is_not_worth_retrying(kind, stream, server):
    server.behave("error", status=429, code="insufficient_quota", type="insufficient_quota",
                  message="You exceeded your current quota")
    error = failure_of(kind, server.base_url, stream=stream)
    assert (error.kind, error.transient) == ("QuotaExceeded", False)


def test_a_key_the_server_echoes_back_is_redacted(kind, stream, server):
    server.behave("echo_auth")
    error = failure_of(kind, server.base_url, stream=stream)
    assert error.kind == "AuthenticationError"
    assert KEY not in str(error) and "Bearer [redacted]" in str(error)


def test_escape_sequences_are_stripped_from_messages(kind, server):
    server.behave("escapes")
    error = failure_of(kind, server.base_url)
    message = str(error)
    assert error.kind == "BadRequest" and "red" in message and "end" in message
    assert not any(c in message for c in "\x1b\x07\x9b\n") and "pwned" not in message
    assert ESCAPES not in message


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_never_followed(kind, stream, server, status):
    target = server.base_url.replace("/v1", "/v2") + "/chat/completions"
    server.behave("redirect", status=status, location=target)
    error = failure_of(kind, server.base_url, stream=stream)
    assert (error.kind, error.transient, error.status) == ("Redirected", False, status)
    assert target in str(error)
    assert f"set api_url to {server.base_url.replace('/v1', '/v2')}" in str(error)
    assert server.requests == 1  # the same server, a path away: still not followed


def test_cookies_from_the_server_are_not_sent_back(kind, server):
    server.behave("set_cookie")
    assert all(isinstance(r, Response) for r in run(kind, server.base_url, calls=2))
    assert len(server.seen) == 2 and "cookie" not in server.seen[1]


# Limits


@pytest.mark.parametrize("behaviour", ["endless", "endless-close", "gzip_bomb", "gzip_bomb-length"])
def test_answers_past_the_size_limit_are_refused(kind, stream, server, behaviour):
    if behaviour == "endless-close":
        server.behave("endless", framing="close")
    elif behaviour == "gzip_bomb-length":
        server.behave("gzip_bomb", length=True)  # refused by its Content-Length alone
    else:
        server.behave(behaviour)
    error = failure_of(kind, server.base_url, stream=stream)
    assert (error.kind, error.transient) == ("ResponseTooLarge", False)


def test_the_size_limit_is_an_option(kind, server):
    server.behave("answer", content="x" * 5000, gzip=True)  # small compressed, 5 kB inflated
    error = failure_of(kind, server.base_url, max_response_bytes=2048)
    assert error.kind == "ResponseTooLarge" and "max_response_bytes=2048" in str(error)
    assert isinstance(run(kind, server.base_url, max_response_bytes=8192)[0], Response)


_MEMORY_PROBE = """
import asyncio, resource, sys
from capflow.errors import ServingError
from capflow.serving.transport import TransportOptions
from capflow.serving._{module}_transport import {cls} as Transport

def peak_mb():
    # VmHWM: this process's own peak. ru_maxrss would start from the parent's peak at fork
    # (Linux carries it across exec), so a big pytest process would hide this one.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale

async def main():
    transport = Transport(sys.argv[1], None, TransportOptions(timeout=30))
    before = peak_mb()
    kinds = []
    for stream in (False, True):
        try:
            await (transport.chat_stream if stream else transport.chat)({{"messages": []}})
        except ServingError as exc:
            kinds.append(exc.kind)
    await transport.close()
    print(json.dumps({{"kinds": kinds, "before": before, "peak": peak_mb()}}))

import json
asyncio.run(main())
"""


@pytest.mark.parametrize("behaviour", ["endless", "gzip_bomb"])
def test_memory_stays_bounded_against_endless_bodies_and_gzip_bombs(kind, server, behaviour):
    # The client runs in a process of its own, whose peak RSS is its own: an endless body and
    # 10 MB of gzip that inflates to some 10 GB, each asked for plainly and as a stream. (With
    # no limit, a 400 kB bomb alone takes this process past 700 MB.)
    server.behave(behaviour)
    module, cls = {"http": ("http", "HttpTransport"), "aiohttp": ("aiohttp", "AiohttpTransport"),
                   "sdk": ("sdk", "SDKTransport")}[kind]
    script = _MEMORY_PROBE.format(module=module, cls=cls)
    done = subprocess.run([sys.executable, "-c", script, server.base_url], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{kind} {behaviour}: peak RSS {report['peak']:.0f} MB"
          f" ({report['before']:.0f} MB before the requests)")
    assert report["kinds"] == ["ResponseTooLarge", "ResponseTooLarge"]
    assert report["peak"] < 300


@pytest.mark.parametrize("behaviour", ["huge_header", "endless_header", "many_headers"])
def test_headers_past_the_limits_are_refused(kind, stream, server, behaviour):
    if behaviour == "endless_header":
        server.behave("huge_header", endless=True)
    else:
        server.behave(behaviour)
    error = failure_of(kind, server.base_url, stream=stream)
    assert (error.kind, error.transient) == ("ResponseTooLarge", False)
    assert "headers" in str(error)


def test_the_timeout_bounds_the_whole_request_against_a_drip(kind, stream, server):
    server.behave("drip", interval=0.1)
    started = time.monotonic()
    error = failure_of(kind, server.base_url, stream=stream, timeout=0.6)
    elapsed = time.monotonic() - started
    assert (error.kind, error.transient) == ("Timeout", True)
    assert 0.55 <= elapsed < 1.5, elapsed


# Keys


@pytest.mark.parametrize("bad", ["\r\nX-Injected: 1", "\n", "\x00", "\x7f", "\u2028", "€"],
                         ids=["crlf", "lf", "nul", "del", "u2028", "euro"])
def test_a_key_that_cannot_be_a_header_is_a_config_error(kind, bad):
    key = f"sk-good-start{bad}end"
    with pytest.raises(ConfigError) as caught:
        TRANSPORTS[kind]("http://127.0.0.1:9/v1", key, TransportOptions())
    assert key not in str(caught.value) and "sk-good-start" not in str(caught.value)


def test_the_serving_names_the_environment_variable_of_a_bad_key(kind, monkeypatch):
    monkeypatch.setenv("CONFORMANCE_KEY", "sk-secret-part\r\nX-Evil: yes")
    serving = OpenAIServing(api_url="http://127.0.0.1:9/v1", key_name_of_api_key="CONFORMANCE_KEY",
                            model_name="m", transport=kind)
    with pytest.raises(ConfigError, match="CONFORMANCE_KEY") as caught:
        asyncio.run(serving.start())
    assert "sk-secret-part" not in str(caught.value)


# Connections


def test_a_connection_the_server_closed_while_idle_is_replaced(kind, server):
    server.behave("idle_close", after=0.05)
    results = run(kind, server.base_url, calls=2, pause=0.3)
    assert all(isinstance(r, Response) for r in results), results
    assert (server.connections, server.requests) == (2, 2)


def test_a_kept_alive_connection_closed_as_it_is_reused_is_sent_again(kind, server):
    # The race a keep-alive timeout makes: the server closes the idle connection just as the
    # next request goes out on it. That request is sent again, at once, on a new connection.
    server.behave("stale")
    results = run(kind, server.base_url, calls=2)
    assert all(isinstance(r, Response) for r in results), results
    assert (server.connections, server.requests) == (2, 3)


def test_a_reset_is_a_transient_connection_error(kind, stream, server):
    server.behave("reset")
    error = failure_of(kind, server.base_url, stream=stream)
    assert (error.kind, error.transient) == ("ConnectionError", True)
    assert server.requests == 1


def test_a_refused_connection_is_a_connection_error(kind, server):
    url = server.base_url
    server.stop()
    error = failure_of(kind, url)
    assert (error.kind, error.transient) == ("ConnectionError", True)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [("429", "RateLimited"), ("500", "ServerError"), ("502", "ServerError"),
     ("503", "ServerError"), ("malformed", "BadResponse"), ("empty_choices", "BadResponse"),
     ("reset", "ConnectionError"), ("hang", "Timeout")],
)
def test_each_fault_of_the_fake_server_is_the_same_kind_everywhere(kind, stream, fault, expected):
    config = FaultConfig(**{f"rate_{fault}": 1.0}, retry_after=2, hang_seconds=5)
    with FakeOpenAIServer(faults=config) as fake:
        error = failure_of(kind, fake.base_url, stream=stream, timeout=0.5)
    assert (error.kind, error.transient) == (expected, True)
    if fault == "429":
        assert error.retry_after == 2.0


# TLS


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_server(ca: trustme.CA, *names: str, **cert: Any) -> HostileServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names, **cert).configure_cert(context)
    return HostileServer(ssl=context)


@pytest.fixture
def ca_file(ca, tmp_path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def test_tls_with_a_private_ca_in_ca_file(kind, stream, ca, ca_file):
    with tls_server(ca, "127.0.0.1") as server:
        assert server.base_url.startswith("https://")
        answer_of(kind, server.base_url, stream=stream, ca_file=ca_file)


def test_tls_with_a_private_ca_in_ssl_cert_file(kind, ca, ca_file, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    with tls_server(ca, "127.0.0.1") as server:
        answer_of(kind, server.base_url)


@pytest.mark.parametrize("case", ["untrusted", "wrong-host", "expired"])
def test_a_certificate_that_does_not_verify_fails_at_once(kind, ca, ca_file, case):
    now = datetime.datetime.now(datetime.timezone.utc)
    if case == "untrusted":
        server, options = tls_server(ca, "127.0.0.1"), {}
    elif case == "wrong-host":
        server, options = tls_server(ca, "capflow.invalid"), {"ca_file": ca_file}
    else:
        server = tls_server(ca, "127.0.0.1", not_before=now - datetime.timedelta(days=9),
                            not_after=now - datetime.timedelta(days=1))
        options = {"ca_file": ca_file}
    with server:
        error = failure_of(kind, server.base_url, **options)
        assert (error.kind, error.transient) == ("TLSError", False)
        assert "serving.ca_file" in str(error) and "SSL_CERT_FILE" in str(error)
        assert (server.connections, server.requests) == (1, 0)  # one attempt, nothing sent


def test_an_unreadable_ca_file_is_a_config_error(kind, tmp_path):
    missing = str(tmp_path / "missing.pem")
    for url in ("https://127.0.0.1:9/v1", "http://127.0.0.1:9/v1"):
        with pytest.raises(ConfigError, match="serving.ca_file"):
            TRANSPORTS[kind](url, KEY, TransportOptions(ca_file=missing))
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate")
    with pytest.raises(ConfigError, match="serving.ca_file"):
        TRANSPORTS[kind]("https://127.0.0.1:9/v1", KEY, TransportOptions(ca_file=str(not_pem)))
