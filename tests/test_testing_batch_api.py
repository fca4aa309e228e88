"""Tests for the fake server's Batch and Files APIs, over real HTTP on 127.0.0.1 through the
official ``openai`` SDK (so the wire format is the one the SDK reads)."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types import Batch
from PIL import Image

from capflow.testing.server import FakeOpenAIServer, describe_image

DONE = ("completed", "failed", "expired", "cancelled")


def png(colour: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def chat_body(colour: tuple[int, int, int], **extra: Any) -> dict[str, Any]:
    url = f"data:image/png;base64,{base64.b64encode(png(colour)).decode()}"
    messages = [{"role": "system", "content": "Describe images."},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    return {"model": "m", "messages": messages, **extra}


def line(custom_id: str, body: dict[str, Any] | None = None,
         url: str = "/v1/chat/completions") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": body or chat_body((len(custom_id) * 20 % 256, 10, 200))}


def lines(n: int, prefix: str = "row") -> list[dict[str, Any]]:
    return [line(f"{prefix}-{i}", chat_body((i * 10 % 256, 40, 90))) for i in range(n)]


def upload(client: openai.OpenAI, requests: list[dict[str, Any]]) -> str:
    data = "".join(json.dumps(r) + "\n" for r in requests).encode()
    return client.files.create(file=("batch.jsonl", data), purpose="batch").id


def submit(client: openai.OpenAI, requests: list[dict[str, Any]]) -> Batch:
    return client.batches.create(input_file_id=upload(client, requests),
                                 endpoint="/v1/chat/completions", completion_window="24h")


def wait(client: openai.OpenAI, batch_id: str, timeout: float = 5.0) -> Batch:
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in DONE:
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.01)
    return batch


def run(client: openai.OpenAI, requests: list[dict[str, Any]]) -> Batch:
    return wait(client, submit(client, requests).id)


def results(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    """A results file's lines by custom_id (none for no file)."""
    if file_id is None:
        return {}
    text = client.files.content(file_id).text
    found = [json.loads(raw) for raw in text.splitlines()]
    assert len({r["custom_id"] for r in found}) == len(found)
    return {r["custom_id"]: r for r in found}


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(batch_latency=0.0) as srv:
        yield srv


@pytest.fixture
def client(server: FakeOpenAIServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as api:
        yield api


def test_a_batch_answers_each_line_as_the_live_endpoint_does(
    server: FakeOpenAIServer, client: openai.OpenAI
) -> None:
    schema = {"type": "object", "properties": {"caption": {"type": "string"}}}
    bodies = {"plain": chat_body((255, 0, 0)), "blue": chat_body((0, 0, 255), max_tokens=50),
              "structured": chat_body((0, 128, 0), response_format={
                  "type": "json_schema", "json_schema": {"name": "c", "schema": schema}})}
    created = submit(client, [line(cid, body) for cid, body in bodies.items()])
    assert created.status == "validating"
    assert created.endpoint == "/v1/chat/completions" and created.completion_window == "24h"
    batch = wait(client, created.id)

    assert batch.status == "completed" and batch.error_file_id is None and batch.errors is None
    assert batch.request_counts is not None
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 3, "failed": 0}
    assert batch.model == "m"
    assert batch.in_progress_at and batch.completed_at and batch.expires_at
    assert batch.completed_at >= batch.in_progress_at >= batch.created_at
    output = results(client, batch.output_file_id)
    assert set(output) == set(bodies)
    assert server.requests == []  # a batch makes no live request
    assert server.batches_submitted[0].custom_ids == tuple(bodies)
    assert server.batches_submitted[0].input_file_id == batch.input_file_id
    assert server.batch_lines_answered == dict.fromkeys(bodies, 1)

    for cid, body in bodies.items():
        result = output[cid]
        assert result["error"] is None and result["id"].startswith("batch_req_")
        assert result["response"]["status_code"] == 200 and result["response"]["request_id"]
        answer = result["response"]["body"]
        live = client.chat.completions.create(**body)
        assert answer["object"] == "chat.completion" and answer["model"] == live.model
        assert answer["choices"][0]["message"]["content"] == live.choices[0].message.content
        assert live.usage is not None
        assert answer["usage"] == live.usage.model_dump(include=set(answer["usage"]))
    assert output["plain"]["response"]["body"]["choices"][0]["message"]["content"] == (
        describe_image(png((255, 0, 0))))
    assert len(server.requests) == len(bodies)

    out_file = client.files.retrieve(batch.output_file_id or "")
    assert out_file.purpose == "batch_output" and out_file.object == "file"


def test_a_line_the_live_endpoint_refuses_goes_to_the_error_file(
    client: openai.OpenAI,
) -> None:
    broken = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}
    batch = run(client, [line("good"), line("bad", broken)])
    assert batch.status == "completed" and batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    assert set(results(client, batch.output_file_id)) == {"good"}
    bad = results(client, batch.error_file_id)["bad"]
    assert bad["response"]["status_code"] == 400 and bad["error"] is None
    assert bad["response"]["body"]["error"]["message"] == "Invalid image"


def test_error_rate_fails_lines_that_succeed_when_resubmitted(
    server: FakeOpenAIServer, client: openai.OpenAI
) -> None:
    server.set_batch_faults(error_rate=0.5, seed=3)
    requests = lines(16)
    batch = run(client, requests)
    assert batch.status == "completed" and batch.request_counts is not None
    failed = results(client, batch.error_file_id)
    assert 0 < len(failed) < 16 and batch.request_counts.failed == len(failed)
    assert len(results(client, batch.output_file_id)) == 16 - len(failed)
    for result in failed.values():
        assert result["response"]["status_code"] == 500 and result["error"] is None
        assert result["response"]["body"]["error"]["type"] == "server_error"

    again = run(client, [r for r in requests if r["custom_id"] in failed])
    assert again.status == "completed" and again.error_file_id is None
    assert set(results(client, again.output_file_id)) == set(failed)
    assert server.batch_lines_answered == {r["custom_id"]: 1 for r in requests}

    server.reset()  # attempts start over: the same lines fail again
    assert set(results(client, run(client, requests).error_file_id)) == set(failed)


def test_expire_next_answers_some_lines_and_leaves_the_rest(
    server: FakeOpenAIServer, client: openai.OpenAI
) -> None:
    server.set_batch_faults(expire_next=1, expire_after=2)
    batch = run(client, lines(5))
    assert batch.status == "expired" and batch.expired_at is not None
    assert batch.request_counts is not None and batch.request_counts.completed == 2
    assert set(results(client, batch.output_file_id)) == {"row-0", "row-1"}
    unrun = results(client, batch.error_file_id)
    assert set(unrun) == {"row-2", "row-3", "row-4"}
    assert all(r["response"] is None and r["error"]["code"] == "batch_expired"
               for r in unrun.values())
    assert set(server.batch_lines_answered) == {"row-0", "row-1"}

    server.expire_next, server.batch_expire_after = 1, 0
    nothing = run(client, lines(2, "other"))
    assert nothing.status == "expired" and nothing.output_file_id is None
    assert run(client, lines(2, "last")).status == "completed"  # only the next N expire


def test_fail_next_fails_whole_batches(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.set_batch_faults(fail_next=1)
    batch = run(client, lines(3))
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.output_file_id is None and batch.error_file_id is None
    assert batch.errors is not None and batch.errors.data
    assert batch.errors.data[0].code == "token_limit_exceeded"
    assert server.batch_lines_answered == {}
    assert run(client, lines(3)).status == "completed"
    assert len(server.batches_submitted) == 2


def test_faults_can_be_set_over_http(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    request = urllib.request.Request(f"{server.url}/_batch_faults", method="POST",
                                     data=json.dumps({"fail_next": 1}).encode())
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
    assert server.fail_next == 1
    assert run(client, lines(1)).status == "failed"


def test_cancel_stops_before_the_next_line(
    server: FakeOpenAIServer, client: openai.OpenAI
) -> None:
    server.batch_line_latency = 0.03
    batch = submit(client, lines(40))
    deadline = time.monotonic() + 5
    while (counts := client.batches.retrieve(batch.id).request_counts) is None or (
            counts.completed < 2):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert client.batches.cancel(batch.id).status == "cancelling"
    batch = wait(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at and batch.cancelling_at
    assert batch.request_counts is not None
    done = batch.request_counts.completed
    assert 2 <= done < 40
    output = results(client, batch.output_file_id)
    unrun = results(client, batch.error_file_id)
    assert len(output) == done and len(unrun) == 40 - done
    assert all(r["error"]["code"] == "batch_cancelled" for r in unrun.values())
    answered = server.batch_lines_answered
    assert set(answered) == set(output) and set(answered.values()) == {1}
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_cancel_while_waiting_answers_nothing(
    server: FakeOpenAIServer, client: openai.OpenAI
) -> None:
    server.batch_latency = 30.0  # cancelling must not wait it out
    batch = submit(client, lines(3))
    client.batches.cancel(batch.id)
    batch = wait(client, batch.id, timeout=2)
    assert batch.status == "cancelled" and batch.output_file_id is None
    assert len(results(client, batch.error_file_id)) == 3
    assert server.batch_lines_answered == {}


def test_list_is_newest_first_and_paginates(client: openai.OpenAI) -> None:
    file_id = upload(client, lines(1))
    created = [client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                     completion_window="24h", metadata={"n": str(n)}).id
               for n in range(5)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == created[:-3:-1] and page.has_more
    assert [b.id for b in client.batches.list(limit=2)] == created[::-1]  # every page
    rest = client.batches.list(limit=10, after=created[2])
    assert [b.id for b in rest.data] == created[1::-1] and not rest.has_more
    assert rest.data[0].metadata == {"n": "1"}
    with pytest.raises(openai.BadRequestError):
        client.batches.list(limit=0)


def test_duplicate_custom_ids_fail_validation(
    server: FakeOpenAIServer, client: openai.OpenAI
) -> None:
    batch = run(client, [line("a"), line("b"), line("a")])
    assert batch.status == "failed" and batch.errors is not None and batch.errors.data
    [error] = batch.errors.data
    assert (error.code, error.line, error.param) == ("duplicate_custom_id", 3, "custom_id")
    assert batch.output_file_id is None and server.batch_lines_answered == {}
    assert server.batches_submitted[0].custom_ids == ("a", "b", "a")


@pytest.mark.parametrize(("content", "problem"), [
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n{no',
     "line 2 is not valid JSON"),
    (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}', "'body'"),
    (b'{"custom_id": 7, "method": "POST", "url": "/v1/chat/completions", "body": {}}',
     "'custom_id'"),
    (b'{"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {}}',
     "'method'"),
    (b"[1, 2]", "not a JSON object"),
])
def test_a_malformed_input_file_is_refused(
    client: openai.OpenAI, content: bytes, problem: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("bad.jsonl", content), purpose="batch")
    assert problem in refused.value.message


def test_batch_create_checks_its_arguments(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions",
                              completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=upload(client, lines(1)), endpoint="/v1/embeddings",
                              completion_window="24h")
    other = client.files.create(file=("notes.txt", b"hello"), purpose="user_data")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=other.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_missing")


def test_files_keep_their_bytes_and_need_the_api_key() -> None:
    data = "".join(json.dumps(r) + "\n" for r in lines(2)).encode()
    with FakeOpenAIServer(api_key="secret", batch_latency=0.0) as server:
        with (openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0) as bad,
              pytest.raises(openai.AuthenticationError)):
            bad.files.create(file=("b.jsonl", data), purpose="batch")
        with openai.OpenAI(base_url=server.base_url, api_key="secret", max_retries=0) as api:
            stored = api.files.create(file=("b.jsonl", data), purpose="batch")
            assert (stored.object, stored.bytes, stored.filename, stored.purpose) == (
                "file", len(data), "b.jsonl", "batch")
            assert stored.id.startswith("file-") and stored.created_at > 0
            assert api.files.retrieve(stored.id) == stored
            assert api.files.content(stored.id).content == data
            assert api.files.delete(stored.id).deleted
            with pytest.raises(openai.NotFoundError):
                api.files.retrieve(stored.id)
