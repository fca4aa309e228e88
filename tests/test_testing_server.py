"""Tests for capflow.testing.server, always over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from PIL import Image

from capflow.testing.faults import FaultConfig
from capflow.testing.server import DEFAULT_MODEL, FakeOpenAIServer, describe_image

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT_ONLY = [{"role": "user", "content": "hello"}]


def image_bytes(size: tuple[int, int], color: tuple[int, ...], fmt: str = "PNG") -> bytes:
    mode = "RGBA" if len(color) == 4 else "RGB"
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def client(base_url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)


async def chat(
    server: FakeOpenAIServer, model: str = "m", messages: Any = TEXT_ONLY, api_key: str = "unused"
) -> Any:
    """One SDK chat completion, closing the client's connections afterwards."""
    async with client(server.base_url, api_key) as api:
        return await api.chat.completions.create(model=model, messages=messages)


async def list_models(server: FakeOpenAIServer, api_key: str = "unused") -> list[str]:
    async with client(server.base_url, api_key) as api:
        return [m.id async for m in api.models.list()]


async def post(url: str, body: Any, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Raw POST so faults are seen exactly as sent, without SDK interpretation."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.post(url, data=data, headers={"Content-Type": "application/json"}) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as srv:
        yield srv


def test_describe_image_is_size_and_rounded_mean_colour() -> None:
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    img.paste((0, 0, 255), (2, 0, 4, 2))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert describe_image(buf.getvalue()) == "4x2 #800080"  # 127.5 rounds to 128
    assert describe_image(image_bytes((3, 5), (1, 2, 3, 40))) == "3x5 #010203"  # alpha dropped
    with pytest.raises(ValueError, match="Invalid image"):
        describe_image(b"not an image")


def test_sdk_round_trip_with_images(server: FakeOpenAIServer) -> None:
    png = image_bytes((32, 16), (10, 200, 30))
    jpeg = image_bytes((8, 8), (250, 250, 250), "JPEG")
    messages = [
        {"role": "system", "content": "You caption images."},
        {"role": "user", "content": [
            {"type": "text", "text": "Describe these two"},
            image_part(data_url(png)),
            image_part(data_url(jpeg, "image/jpeg")),
        ]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [image_part("https://example.com/a.jpg")]},
    ]

    completion = asyncio.run(chat(server, "vlm", messages))
    expected = [describe_image(png), describe_image(jpeg), "url https://example.com/a.jpg"]
    assert expected[0] == "32x16 #0ac81e"
    assert completion.choices[0].message.content == "; ".join(expected)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "vlm"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 3 + 3 + 1 + 3 * 85
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 6

    (rec,) = server.requests
    assert rec.model == "vlm"
    assert rec.system == "You caption images."
    assert rec.texts == [("user", "Describe these two"), ("assistant", "ok")]
    assert rec.images == expected
    assert rec.headers == {"Authorization": "Bearer unused"}
    assert (rec.status, rec.fault) == (200, None)
    stats = server.stats()
    assert stats["requests_total"] == stats["responses_ok"] == 1
    assert stats["in_flight"] == 0


def test_text_only_answer_and_path_without_v1(server: FakeOpenAIServer) -> None:
    status, _, body = asyncio.run(
        post(f"{server.url}/chat/completions", {"model": "m", "messages": TEXT_ONLY})
    )
    assert status == 200
    assert json.loads(body)["choices"][0]["message"]["content"] == "no image"


def test_auth_required_when_api_key_configured() -> None:
    with FakeOpenAIServer(api_key="s3cret") as server:

        async def go() -> None:
            with pytest.raises(openai.AuthenticationError) as info:
                await chat(server, api_key="wrong")
            assert info.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                await list_models(server, "wrong")
            ok = await chat(server, api_key="s3cret")
            assert ok.choices[0].message.content == "no image"

        asyncio.run(go())
        assert [r.status for r in server.requests] == [401, 200]
        assert server.requests[1].headers == {"Authorization": "Bearer s3cret"}


def test_models_restrict_and_list() -> None:
    with FakeOpenAIServer(models=["a", "b"]) as server:

        async def go() -> list[str]:
            with pytest.raises(openai.NotFoundError) as info:
                await chat(server, "zzz")
            assert info.value.code == "model_not_found"
            assert "The model `zzz` does not exist" in str(info.value)
            await chat(server, "b")
            return await list_models(server)

        assert asyncio.run(go()) == ["a", "b"]
        assert [r.status for r in server.requests] == [404, 200]

    with FakeOpenAIServer() as server:
        assert asyncio.run(list_models(server)) == [DEFAULT_MODEL]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "could not parse"),
        ({"messages": TEXT_ONLY}, "'model'"),
        ({"model": "m", "messages": []}, "'messages'"),
        ({"model": "m", "messages": [{"role": "user", "content": [
            image_part("data:image/png;base64," + base64.b64encode(b"junk").decode())]}]},
         "Invalid image"),
    ],
)
def test_malformed_requests_get_400(
    server: FakeOpenAIServer, body: Any, message: str
) -> None:
    status, _, raw = asyncio.run(post(f"{server.base_url}/chat/completions", body))
    assert status == 400
    assert message in json.loads(raw)["error"]["message"]
    assert server.requests[-1].status == 400


def test_latency_and_max_in_flight() -> None:
    with FakeOpenAIServer(latency=0.3) as server:

        async def go() -> float:
            async with client(server.base_url) as api:
                start = time.monotonic()
                await asyncio.gather(*(
                    api.chat.completions.create(model="m", messages=TEXT_ONLY) for _ in range(20)
                ))
                return time.monotonic() - start

        elapsed = asyncio.run(go())
        assert 0.3 <= elapsed < 0.3 * 5  # concurrent, not serialised
        stats = server.stats()
        assert stats["max_in_flight"] == 20
        assert stats["responses_ok"] == 20
        assert stats["in_flight"] == 0


def test_stats_endpoint_and_reset(server: FakeOpenAIServer) -> None:
    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        await post(f"{server.base_url}/chat/completions", {"model": "m", "messages": TEXT_ONLY})
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}/_stats") as resp:
                before = await resp.json()
            async with session.post(f"{server.url}/_reset") as resp:
                assert resp.status == 200
            async with session.get(f"{server.url}/_stats") as resp:
                after = await resp.json()
        return before, after

    before, after = asyncio.run(go())
    assert before == server_stats_like(requests_total=1, responses_ok=1, max_in_flight=1)
    assert after["requests_total"] == 0 and after["max_in_flight"] == 0
    assert server.requests == []


def server_stats_like(**counts: int) -> dict[str, Any]:
    faults = dict.fromkeys(FaultConfig().rates(), 0)
    return {"in_flight": 0, "statuses": {"200": 1}, "faults": faults, **counts}


@pytest.mark.parametrize("kind", ["429", "500", "502", "503"])
def test_error_status_faults(kind: str) -> None:
    faults = FaultConfig(**{f"rate_{kind}": 1.0}, retry_after=2)
    with FakeOpenAIServer(faults=faults) as server:
        status, headers, body = asyncio.run(
            post(f"{server.base_url}/chat/completions", {"model": "m", "messages": TEXT_ONLY})
        )
        assert status == int(kind)
        assert "error" in json.loads(body)
        if kind == "429":
            assert headers["Retry-After"] == "2"
        assert server.stats()["faults"][kind] == 1
        assert server.requests[0].fault == kind


def test_malformed_and_empty_choices_faults() -> None:
    req = {"model": "m", "messages": TEXT_ONLY}
    with FakeOpenAIServer(faults=FaultConfig(rate_malformed=1.0)) as server:
        status, _, body = asyncio.run(post(f"{server.base_url}/chat/completions", req))
        assert status == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(body)
    with FakeOpenAIServer(faults=FaultConfig(rate_empty_choices=1.0)) as server:
        status, _, body = asyncio.run(post(f"{server.base_url}/chat/completions", req))
        assert status == 200
        assert json.loads(body)["choices"] == []
        assert server.stats()["responses_ok"] == 0


def test_reset_fault_drops_connection() -> None:
    with FakeOpenAIServer(faults=FaultConfig(rate_reset=1.0)) as server:
        req = {"model": "m", "messages": TEXT_ONLY}
        with pytest.raises(aiohttp.ClientError):
            asyncio.run(post(f"{server.base_url}/chat/completions", req))

        async def via_sdk() -> None:
            with pytest.raises(openai.APIConnectionError):
                await chat(server)

        asyncio.run(via_sdk())
        assert server.stats()["faults"]["reset"] == 2
        assert [r.status for r in server.requests] == [0, 0]


def test_hang_fault_stalls_then_answers_or_is_abandoned() -> None:
    req = {"model": "m", "messages": TEXT_ONLY}
    with FakeOpenAIServer(faults=FaultConfig(rate_hang=1.0, hang_seconds=0.3)) as server:
        start = time.monotonic()
        status, _, _ = asyncio.run(post(f"{server.base_url}/chat/completions", req))
        assert status == 200 and time.monotonic() - start >= 0.3
        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(post(f"{server.base_url}/chat/completions", req, timeout=0.1))
        time.sleep(0.1)  # let the server notice the client went away
        assert [r.status for r in server.requests] == [200, 499]
        assert server.stats()["in_flight"] == 0


def test_stop_is_prompt_with_a_request_hanging() -> None:
    server = FakeOpenAIServer(faults=FaultConfig(rate_hang=1.0, hang_seconds=30)).start()

    async def go() -> float:
        req = {"model": "m", "messages": TEXT_ONLY}
        pending = asyncio.create_task(post(f"{server.base_url}/chat/completions", req))
        await asyncio.sleep(0.2)
        start = time.monotonic()
        await asyncio.to_thread(server.stop)
        with pytest.raises(aiohttp.ClientError):
            await pending
        return time.monotonic() - start

    assert asyncio.run(go()) < 3


def test_faults_are_seeded_and_deterministic() -> None:
    faults = FaultConfig(rate_500=0.3, rate_503=0.3, seed=42)
    req = {"model": "m", "messages": TEXT_ONLY}

    def statuses(server: FakeOpenAIServer) -> list[int]:
        async def go() -> list[int]:
            return [(await post(f"{server.base_url}/chat/completions", req))[0]
                    for _ in range(30)]
        return asyncio.run(go())

    with FakeOpenAIServer(faults=faults) as server:
        first = statuses(server)
        server.reset()
        assert statuses(server) == first
    assert set(first) == {200, 500, 503}
    with pytest.raises(ValueError):
        FaultConfig(rate_429=0.6, rate_500=0.6)


def test_port_in_use_fails_to_start(server: FakeOpenAIServer) -> None:
    with pytest.raises(RuntimeError, match="failed to start"):
        FakeOpenAIServer(port=server.port).start()


def test_subprocess_mode() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "FAKE_OPENAI_KEY": "k-123"}
    cmd = [sys.executable, "-m", "capflow.testing.server", "--port", "0", "--latency", "0.05",
           "--api-key-env", "FAKE_OPENAI_KEY", "--model", "m1", "m2"]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 10)
            assert ready, "server did not report LISTENING in time"
            line = proc.stdout.readline().strip()
            assert line.startswith("LISTENING http://127.0.0.1:") and line.endswith("/v1")
            base_url = line.split()[1]

            async def go() -> str | None:
                async with client(base_url, "k-123") as api:
                    with pytest.raises(openai.NotFoundError):
                        await api.chat.completions.create(model="other", messages=TEXT_ONLY)
                    done = await api.chat.completions.create(model="m2", messages=TEXT_ONLY)
                    return done.choices[0].message.content

            assert asyncio.run(go()) == "no image"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0
            assert proc.stdout.read() == ""  # exactly one line of output
        finally:
            if proc.poll() is None:
                proc.kill()
