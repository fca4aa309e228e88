"""Honest answers, end to end: what a server says is never taken for more than it is. A cut-off,
refused or empty answer is a row error that keeps the server's text; a key the server echoes
back, or escape sequences it sends, reach no file and no terminal."""

from __future__ import annotations

import json
import sqlite3

import pytest
from conftest import make_dataset, read_rows, run_capflow

from capflow.testing.hostile import HostileServer
from capflow.testing.server import FakeOpenAIServer

KEY = "sk-test-0123456789abcdef"


@pytest.fixture
def hostile():
    with HostileServer() as server:
        yield server


def _run(server, tmp_path, *more: str, rows: int = 3, env: dict[str, str] | None = None):
    data, _ = make_dataset(tmp_path, rows)
    out = tmp_path / "o.jsonl"
    result = run_capflow(f"input={data}", f"output={out}", f"api_url={server.base_url}",
                         "model_name=m", "retry.initial_wait=0.01", "retry.max_attempts=2",
                         *more, cwd=tmp_path, env=env)
    return result, read_rows(out) if out.exists() else []


@pytest.mark.parametrize("stream", ["false", "true"])
def test_a_cut_off_answer_is_a_truncated_row_error_keeping_its_text(hostile, tmp_path, stream):
    hostile.behave("answer", content="A red bicycle leaning on a", finish_reason="length")
    result, rows = _run(hostile, tmp_path, f"serving.send_request_stream={stream}")
    assert result.returncode == 1
    error = rows[0]["_error"]
    assert error["type"] == "Truncated" and "caption" not in rows[0]
    assert error["text"] == "A red bicycle leaning on a"
    assert "accept_truncated=true" in error["message"]


def test_accept_truncated_keeps_cut_off_answers(hostile, tmp_path):
    hostile.behave("answer", content="A red bicycle leaning on a", finish_reason="length")
    result, rows = _run(hostile, tmp_path, "accept_truncated=true")
    assert result.returncode == 0, result.stdout
    assert [r["caption"] for r in rows] == ["A red bicycle leaning on a"] * 3


@pytest.mark.parametrize("stream", ["false", "true"])
def test_a_refusal_is_a_refused_row_error_with_its_text(hostile, tmp_path, stream):
    hostile.behave("answer", content=None, refusal="I can't help with that.")
    result, rows = _run(hostile, tmp_path, f"serving.send_request_stream={stream}")
    assert result.returncode == 1
    assert rows[0]["_error"]["type"] == "Refused"
    assert rows[0]["_error"]["text"] == "I can't help with that."


@pytest.mark.parametrize("stream", ["false", "true"])
@pytest.mark.parametrize("content", ["", "   ", None])
def test_an_empty_answer_is_the_same_row_error_streamed_or_not(hostile, tmp_path, stream,
                                                                content):
    hostile.behave("answer", content=content)
    result, rows = _run(hostile, tmp_path, f"serving.send_request_stream={stream}")
    assert result.returncode == 1
    assert {r["_error"]["type"] for r in rows} == {"EmptyAnswer"}


def test_content_given_as_parts_is_joined(hostile, tmp_path):
    parts = [{"type": "text", "text": "A red "}, {"type": "text", "text": "bicycle."}]
    hostile.behave("answer", content=parts)
    result, rows = _run(hostile, tmp_path)
    assert result.returncode == 0, result.stdout
    assert rows[0]["caption"] == "A red bicycle."


def test_a_200_carrying_an_error_keeps_the_servers_message(hostile, tmp_path):
    hostile.behave("answer", body={"error": {"message": "upstream model crashed"}})
    result, rows = _run(hostile, tmp_path)
    assert result.returncode == 1
    assert rows[0]["_error"]["type"] == "ServerError"
    assert "upstream model crashed" in rows[0]["_error"]["message"]


def test_answers_without_usage_get_estimated_tokens_and_budgets_hold(hostile, tmp_path):
    hostile.behave("answer", content="word " * 40, usage=False)
    result, rows = _run(hostile, tmp_path, "max_workers=1", "max_tokens_total=2000", rows=20)
    assert result.returncode == 1
    assert "estimated for" in result.stdout and "without usage" in result.stdout
    assert "max_tokens_total=2000" in result.stderr
    assert 0 < sum("caption" in r for r in rows) < 20


def test_a_key_the_server_echoes_back_is_stored_and_shown_nowhere(hostile, tmp_path):
    hostile.behave("echo_auth")
    failed = tmp_path / "failed.jsonl"
    result, rows = _run(hostile, tmp_path, f"failed_output={failed}",
                        env={"CAPFLOW_API_KEY": KEY})
    assert result.returncode == 1
    assert hostile.seen and hostile.seen[0]["authorization"] == f"Bearer {KEY}"
    assert "[redacted]" in rows[0]["_error"]["message"]
    journal = tmp_path / "o.jsonl.journal.sqlite"
    with sqlite3.connect(journal) as db:
        stored = json.dumps(db.execute("SELECT * FROM rows").fetchall())
    for text in (result.stdout, result.stderr, (tmp_path / "o.jsonl").read_text(),
                 failed.read_text(), stored):
        assert KEY not in text


def test_escape_sequences_from_the_server_never_reach_the_terminal(hostile, tmp_path):
    hostile.behave("escapes")
    result, rows = _run(hostile, tmp_path)
    assert result.returncode == 1
    for text in (result.stdout, result.stderr, json.dumps(rows)):
        assert "\x1b" not in text and "\\u001b" not in text
    assert not any(ord(c) < 32 and c not in "\n" for c in result.stdout + result.stderr)


def test_rows_without_images_are_asked_as_text_when_no_image_is_required(tmp_path):
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"id": 1, "question": "Is the sky blue?"}) + "\n"
        + json.dumps({"id": 2, "question": "Name a colour.", "image": []}) + "\n")
    step = "pipeline.steps.caption"
    args = [f"input={tmp_path / 'd.jsonl'}", "model_name=m", f"{step}.input_prompt_key=question"]
    with FakeOpenAIServer() as server:
        required = run_capflow(*args, f"api_url={server.base_url}",
                               f"output={tmp_path / 'a.jsonl'}", cwd=tmp_path)
        assert len(server.requests) == 0
        assert required.returncode == 1
        assert {r["_error"]["type"] for r in read_rows(tmp_path / "a.jsonl")} == {"NoImage"}
        optional = run_capflow(*args, f"api_url={server.base_url}", f"{step}.require_image=false",
                               f"output={tmp_path / 'b.jsonl'}", cwd=tmp_path)
        asked = sorted(text for r in server.requests for _, text in r.texts)
    assert optional.returncode == 0, optional.stdout + optional.stderr
    assert [r["caption"] for r in read_rows(tmp_path / "b.jsonl")] == ["no image", "no image"]
    assert asked == ["Is the sky blue?", "Name a colour."]
