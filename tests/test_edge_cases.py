"""Failures at the edges: unwritable answers, broken streams, stores that cannot open, odd
paths, and retries that must respect their time bound."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from conftest import make_dataset, read_rows

from capflow.engine import EngineSettings
from capflow.errors import ConfigError, RowError, ServingError
from capflow.images import ImagePreparer
from capflow.operators import PromptedVQAGenerator
from capflow.retry import RetryPolicy
from capflow.serving import OpenAIServing
from capflow.serving._protocol import StreamedAnswer
from capflow.storage import FileStorage


class UnwritableAnswers(PromptedVQAGenerator):
    def apply(self, row, response):
        if row.index == 3:
            return {"caption": {1, 2}}  # a set: not JSON
        return super().apply(row, response)


def test_an_answer_that_cannot_be_written_fails_its_row_only(server, tmp_path):
    data, _ = make_dataset(tmp_path, 8)
    op = UnwritableAnswers(OpenAIServing(api_url=server.base_url, model_name="m"),
                           output_answer_key="caption")
    out = tmp_path / "o.jsonl"
    summary = op.run(FileStorage(str(data), cache_path=str(tmp_path / "c")).step(output=str(out)),
                     settings=EngineSettings(report=False))
    rows = read_rows(out)
    assert summary.done == 7 and summary.failed == 1 and len(rows) == 8
    assert rows[3]["_error"]["type"] == "BadOutput"


@pytest.mark.parametrize(
    ("chunks", "kind"),
    [
        ([{"choices": [{"delta": {"content": "a"}}]}], "BadResponse"),  # cut off
        ([{"choices": []}], "BadResponse"),
        ([{"choices": [], "usage": {"prompt_tokens": 3}}, "[DONE]"], "BadResponse"),  # no choice
        ([{"error": {"message": "overloaded"}}], "StreamError"),
        ([["not", "a", "chunk"]], "BadResponse"),
    ],
)
def test_broken_streams_are_errors_not_captions(chunks, kind):
    answer = StreamedAnswer()
    with pytest.raises(ServingError) as err:
        for chunk in chunks:
            if chunk == "[DONE]":
                answer.add_line(b"data: [DONE]")
            else:
                answer.add(chunk)
        answer.response()
    assert err.value.kind == kind and err.value.transient


def test_a_complete_stream_is_an_answer():
    answer = StreamedAnswer()
    answer.add({"model": "m", "choices": [{"delta": {"content": "a "}}]})
    answer.add({"choices": [{"delta": {"content": "cat"}, "finish_reason": "stop"}]})
    answer.add({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    response = answer.response()
    assert (response.text, response.usage.completion_tokens, response.model) == ("a cat", 2, "m")


def test_a_stream_without_text_is_an_empty_answer_for_the_engine_to_judge():
    answer = StreamedAnswer()
    answer.add({"choices": [{"delta": {"role": "assistant"}, "finish_reason": "stop"}]})
    response = answer.response()
    assert (response.text, response.finish_reason, response.refusal) == ("", "stop", None)


def test_a_streamed_refusal_is_joined_and_lines_split_anywhere_are_joined():
    answer = StreamedAnswer()
    events = b"".join(
        b"data: %s\n\n" % json.dumps(chunk).encode()
        for chunk in [{"choices": [{"delta": {"refusal": "I can't "}}]},
                      {"choices": [{"delta": {"refusal": "do that"}, "finish_reason": "stop"}]}]
    ) + b"data: [DONE]\n\n"
    for start in range(0, len(events), 7):  # pieces that cut lines and JSON apart
        answer.feed(events[start:start + 7])
    response = answer.response()
    assert (response.text, response.refusal, answer.done) == ("", "I can't do that", True)


def test_a_cache_that_cannot_be_opened_is_a_configuration_error(server, tmp_path):
    data, _ = make_dataset(tmp_path, 2)
    (tmp_path / "file").write_text("not a folder")
    op = PromptedVQAGenerator(OpenAIServing(api_url=server.base_url, model_name="m"))
    settings = EngineSettings(cache_path=str(tmp_path / "file" / "cache.sqlite"), report=False)
    with pytest.raises(ConfigError, match="cannot open the response cache or the run journal"):
        op.run(FileStorage(str(data), cache_path=str(tmp_path / "c")).step(), settings=settings)


@pytest.mark.parametrize(("ref", "kind"), [("a\x00b.png", "BadImageReference"),
                                           ("images/../..", "ImageOutsideRoot")])
def test_odd_paths_are_row_errors(tmp_path, ref, kind):
    (tmp_path / "images").mkdir()
    with pytest.raises(RowError) as err:
        ImagePreparer().prepare(ref, tmp_path)
    assert err.value.kind == kind


def test_retries_stop_at_the_rows_time_bound():
    calls = 0

    async def always_busy(_):
        nonlocal calls
        calls += 1
        raise ServingError("RateLimited", "busy", transient=True, retry_after=0.5, status=429)

    policy = RetryPolicy(max_attempts=10, initial_wait=0.01, max_wait=5, max_time=0.2)
    started = time.monotonic()
    with pytest.raises(ServingError):
        asyncio.run(policy.call(always_busy, None, lambda exc: None))
    assert time.monotonic() - started < 0.45 and calls == 1
