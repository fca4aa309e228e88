"""OpenAIServing and the engine's retries, against a real loopback server with injected faults."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest
from conftest import expected_caption, make_dataset, read_rows

from capflow.engine import EngineSettings
from capflow.errors import ConfigError
from capflow.operators import PromptedVQAGenerator
from capflow.redaction import redact
from capflow.request import Request
from capflow.retry import RetryPolicy
from capflow.serving import OpenAIServing
from capflow.storage import FileStorage
from capflow.testing.faults import FaultConfig
from capflow.testing.hostile import HostileServer
from capflow.testing.server import FakeOpenAIServer

FAST_RETRY = RetryPolicy(max_attempts=8, initial_wait=0.01, max_wait=0.2)


@pytest.fixture(params=["http", "aiohttp", "sdk"])
def transport(request) -> str:
    """Every serving test runs over each transport."""
    return request.param


_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def no_proxy(monkeypatch) -> pytest.MonkeyPatch:
    """An environment without proxy settings (tests add their own)."""
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def _run(tmp_path, server, n=20, settings=None, **serving_args):
    data, rows = make_dataset(tmp_path, n)
    serving_args.setdefault("model_name", "m")
    serving = OpenAIServing(api_url=server.base_url, max_workers=8, **serving_args)
    op = PromptedVQAGenerator(serving, system_prompt="S", output_answer_key="caption")
    out = tmp_path / "out.jsonl"
    storage = FileStorage(str(data), cache_path=str(tmp_path / "cache"))
    summary = op.run(storage.step(output=str(out)),
                     settings=settings or EngineSettings(retry=FAST_RETRY, report=False))
    return summary, rows, read_rows(out)


def _all_captioned(tmp_path, rows, written):
    assert [r["id"] for r in written] == [r["id"] for r in rows]
    for original, row in zip(rows, written, strict=True):
        assert row["caption"] == expected_caption(tmp_path / original["image"][0]), row


@pytest.mark.parametrize(
    "faults",
    [
        FaultConfig(rate_429=0.3, retry_after=0.05),
        FaultConfig(rate_500=0.2, rate_502=0.1, rate_503=0.1),
        FaultConfig(rate_malformed=0.3),
        FaultConfig(rate_empty_choices=0.3),
        FaultConfig(rate_reset=0.3),
        FaultConfig(rate_hang=0.3, hang_seconds=3.0),
    ],
    ids=["429", "5xx", "malformed", "empty-choices", "reset", "hang"],
)
def test_transient_faults_are_retried_until_every_row_is_captioned(tmp_path, faults, transport):
    with FakeOpenAIServer(faults=faults) as server:
        summary, rows, written = _run(tmp_path, server, transport=transport, timeout=0.5)
        _all_captioned(tmp_path, rows, written)
    injected = sum(server.stats()["faults"].values())  # hangs are counted once abandoned
    assert injected > 0 and summary.retries >= injected and summary.failed == 0


def test_retries_are_bounded_and_the_row_records_the_last_error(tmp_path, transport):
    policy = RetryPolicy(max_attempts=3, initial_wait=0.01, max_wait=0.05)
    with FakeOpenAIServer(faults=FaultConfig(rate_503=1.0)) as server:
        summary, _, written = _run(
            tmp_path, server, transport=transport, n=4,
            settings=EngineSettings(retry=policy, report=False),
        )
        assert len(server.requests) == 4 * 3
    assert summary.failed == 4 and summary.retries == 4 * 2
    assert written[0]["_error"]["type"] == "ServerError"
    assert written[0]["_error"]["message"].startswith("HTTP 503")
    assert "caption" not in written[0]


def test_retry_after_is_honoured(tmp_path, transport):
    faults = FaultConfig(rate_429=1.0, retry_after=0.3)
    # Bounded by time too: waits for a rate limit need not count as attempts.
    policy = RetryPolicy(max_attempts=2, initial_wait=0.001, max_wait=5, max_time=1.5)
    with FakeOpenAIServer(faults=faults) as server:
        summary, _, _ = _run(tmp_path, server, transport=transport, n=1,
                             settings=EngineSettings(retry=policy, report=False))
    assert summary.elapsed >= 0.3 and summary.failed == 1


def test_client_errors_fail_at_once_with_the_servers_message(tmp_path, transport):
    with FakeOpenAIServer(models=["real-model"]) as server:
        summary, _, written = _run(tmp_path, server, transport=transport, n=3,
                                   model_name="no-such-model")
        assert len(server.requests) == 3
    assert summary.failed == 3 and summary.retries == 0
    assert written[0]["_error"] == {
        "type": "NotFound",
        "message": "HTTP 404: The model `no-such-model` does not exist",
        "stage": "request",
    }


def test_generation_parameters_and_extra_body_reach_the_server(tmp_path, server, transport):
    _run(tmp_path, server, transport=transport, n=2, temperature=0.2, max_tokens=50, top_p=0.9,
         seed=7, extra_body={"top_k": 20})
    assert server.requests[0].params == {
        "temperature": 0.2, "max_tokens": 50, "top_p": 0.9, "seed": 7, "top_k": 20
    }


def test_streamed_answers_are_joined(tmp_path, server, transport):
    summary, rows, written = _run(tmp_path, server, transport=transport, n=3,
                                  send_request_stream=True)
    _all_captioned(tmp_path, rows, written)
    assert all(r.stream for r in server.requests)
    assert summary.completion_tokens > 0


def test_unset_model_uses_the_servers_only_model(tmp_path, transport):
    with FakeOpenAIServer(models=["only-model"]) as server:
        _, rows, written = _run(tmp_path, server, transport=transport, n=2, model_name=None)
        assert {r.model for r in server.requests} == {"only-model"}
    _all_captioned(tmp_path, rows, written)


def test_unset_model_with_several_on_offer_is_a_config_error(tmp_path, transport):
    with FakeOpenAIServer(models=["a", "b"]) as server:
        serving = OpenAIServing(api_url=server.base_url, transport=transport)
        with pytest.raises(ConfigError, match="the server offers a, b"):
            asyncio.run(serving.start())


def test_no_key_needed_for_a_keyless_server(tmp_path, server, monkeypatch, transport):
    monkeypatch.delenv("CAPFLOW_API_KEY", raising=False)
    summary, _, _ = _run(tmp_path, server, transport=transport, n=1)
    assert summary.done == 1
    # The SDK insists on sending some key; the lean client sends none.
    expected = {"Authorization": "Bearer no-key"} if transport == "sdk" else {}
    assert server.requests[0].headers == expected


def test_max_workers_bounds_requests_in_flight(tmp_path):
    with FakeOpenAIServer(latency=0.05) as server:
        data, _ = make_dataset(tmp_path, 40)
        serving = OpenAIServing(api_url=server.base_url, model_name="m", max_workers=5)
        op = PromptedVQAGenerator(serving, output_answer_key="caption")
        op.run(FileStorage(str(data), cache_path=str(tmp_path)).step(),
               settings=EngineSettings(report=False))
        assert server.stats()["max_in_flight"] == 5


def test_cheap_rows_and_one_worker_do_not_stall_the_run(tmp_path):
    # Rows that prepare in microseconds grow the preparation batches past the few rows that
    # may be in progress with max_workers=1: a partial batch must go out rather than wait.
    rows = [{"id": i, "image": [f"http://127.0.0.1:9/{i}.png"],
             "conversation": [{"from": "human", "value": "<image>\nWhat is shown?"}]}
            for i in range(3000)]
    data = tmp_path / "urls.json"
    data.write_text(json.dumps(rows))
    serving = OpenAIServing(api_url=None, model_name="m", max_workers=1)
    op = PromptedVQAGenerator(serving, output_answer_key="caption")
    summaries = []
    runner = threading.Thread(
        target=lambda: summaries.append(op.run(
            FileStorage(str(data), cache_path=str(tmp_path)).step(), dry_run=True,
            settings=EngineSettings(report=False, prepare_workers=1))),
        daemon=True,
    )
    runner.start()
    runner.join(60)
    assert not runner.is_alive(), "the run stalled"
    assert summaries[0].done == 3000 and summaries[0].failed == 0


def test_auto_uses_the_own_client_unless_a_proxy_applies(no_proxy, caplog):
    async def chosen(url: str) -> str:
        serving = OpenAIServing(api_url=url, model_name="m")  # transport=auto
        await serving.start()
        try:
            return type(serving._client).__name__
        finally:
            await serving.close()

    with caplog.at_level(logging.DEBUG, logger="capflow"):
        assert asyncio.run(chosen("http://api.example.org/v1")) == "HttpTransport"
        no_proxy.setenv("HTTP_PROXY", "http://127.0.0.1:9")
        assert asyncio.run(chosen("http://api.example.org/v1")) == "AiohttpTransport"
        assert asyncio.run(chosen("https://api.example.org/v1")) == "HttpTransport"
        no_proxy.setenv("NO_PROXY", ".example.org")
        assert asyncio.run(chosen("http://api.example.org/v1")) == "HttpTransport"
    records = [r for r in caplog.records if "transport=auto" in r.getMessage()]
    lines = [r.getMessage() for r in records]
    assert len(lines) == 4 and "proxy applies" in lines[1] and "own HTTP client" in lines[3]
    # Only the proxy is news worth an info line; the usual choice is a debug one.
    assert [r.levelno for r in records] == [logging.DEBUG, logging.INFO] + [logging.DEBUG] * 2


def test_auto_goes_through_the_proxy_it_found(no_proxy):
    # The hostile server plays an HTTP proxy: a request for an unresolvable host can only be
    # answered through it, and it sees the absolute URL that proxies are sent.
    with HostileServer() as proxy:
        no_proxy.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        serving = OpenAIServing(api_url="http://api.capflow.invalid/v1", model_name="m")

        async def ask():
            await serving.start()
            try:
                return await serving.complete(Request(messages=[{"role": "user",
                                                                 "content": "hi"}]))
            finally:
                await serving.close()

        response = asyncio.run(ask())
    assert response.text == "a red square"
    assert proxy.requests == 1


def test_describe_names_the_endpoint_normalised():
    cases = {
        "HTTPS://API.Example.ORG:443/v1/": "https://api.example.org/v1",
        "http://127.0.0.1:80/v1": "http://127.0.0.1/v1",
        "http://[::1]:8000/v1": "http://[::1]:8000/v1",
        "https://api.example.org:8443/openai/v1//": "https://api.example.org:8443/openai/v1",
    }
    for url, endpoint in cases.items():
        described = OpenAIServing(api_url=url, model_name="m").describe()
        assert described["endpoint"] == endpoint
        assert set(described) == {"serving", "model", "params", "extra_body", "endpoint"}
    assert OpenAIServing(api_url=None).describe()["endpoint"] is None


def test_an_api_url_holding_credentials_is_refused():
    with pytest.raises(ConfigError, match="must not hold a user name or password") as caught:
        OpenAIServing(api_url="https://user:Secret@api.example.org/v1", model_name="m")
    assert "Secret" not in str(caught.value)


def test_start_registers_the_key_and_checks_the_ca_file(server, monkeypatch, tmp_path):
    monkeypatch.setenv("SERVING_TEST_KEY", "sk-registered-by-start-42")
    serving = OpenAIServing(api_url=server.base_url, key_name_of_api_key="SERVING_TEST_KEY",
                            model_name="m", ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="serving.ca_file"):
        asyncio.run(serving.start())
    assert redact("a sk-registered-by-start-42 b") == "a [redacted] b"


def test_answers_past_max_response_bytes_fail_their_row(tmp_path, server, transport):
    summary, _, written = _run(tmp_path, server, transport=transport, n=2,
                               max_response_bytes=1024, extra_body={"pad": "x"})
    # The fake server's answers are small: a tight limit still lets them through...
    assert summary.done == 2
    with HostileServer("endless") as hostile:
        summary, _, written = _run(tmp_path / "2", hostile, transport=transport, n=2,
                                   max_response_bytes=4096)
    # ...and an answer past it fails its row at once, without retries.
    assert summary.failed == 2 and summary.retries == 0
    assert written[0]["_error"]["type"] == "ResponseTooLarge"


def test_invalid_options_are_config_errors():
    with pytest.raises(ConfigError, match="serving.transport"):
        OpenAIServing(api_url=None, transport="curl")
    with pytest.raises(ConfigError, match="max_response_bytes"):
        OpenAIServing(api_url=None, max_response_bytes=10)
