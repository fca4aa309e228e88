"""Structured answers: a prompt's JSON Schema is asked for the way the server supports, each
answer is parsed and validated, a broken one is asked again with the reason, and the parsed
object is written to the row (a row that never validates keeps its raw answer)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import make_dataset, read_rows, run_capflow

from capflow.errors import ConfigError
from capflow.structured import InvalidAnswer, OutputSchema
from capflow.testing.faults import FaultConfig, FaultInjector
from capflow.testing.server import FakeOpenAIServer

CONF = Path(__file__).resolve().parent.parent / "conf"
SCHEMA = yaml.safe_load((CONF / "prompt" / "structured.yaml").read_text())["schema"]


def _args(server: FakeOpenAIServer, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"input={data}", f"output={out}", f"api_url={server.base_url}", "model_name=m",
            "prompt=structured", "max_workers=8", "progress=false", *extra]


def test_the_shipped_schema_has_the_promised_fields():
    props = SCHEMA["properties"]
    assert props["caption"]["type"] == "string" and props["visible_text"]["type"] == "string"
    for key in ("objects", "tags"):
        assert props[key] == {**props[key], "type": "array", "items": {"type": "string"}}
    assert set(SCHEMA["required"]) >= {"caption", "objects", "visible_text", "tags"}


def test_answers_broken_30_percent_of_the_time_end_as_validated_objects(tmp_path):
    data, _ = make_dataset(tmp_path, 50)
    out = tmp_path / "out.jsonl"
    with FakeOpenAIServer(faults=FaultConfig(rate_bad_json=0.3, seed=11)) as server:
        result = run_capflow(*_args(server, data, out), cwd=tmp_path)
        requests = server.requests
    rows = read_rows(out)
    assert len(rows) == 50
    valid = [r for r in rows if "_error" not in r]
    for row in valid:  # an object, not a string, and it matches the schema
        assert isinstance(row["caption"], dict)
        jsonschema.validate(row["caption"], SCHEMA)
    assert len(valid) >= 45, result.stdout
    for row in rows:
        if "_error" in row:  # never validated: the raw answer is kept in the error record
            error = row["_error"]
            assert error["type"] == "InvalidAnswer" and error["text"].startswith("{")
    assert result.returncode == (0 if len(valid) == 50 else 1)
    # Every broken answer was asked again (but the last of a row that never validated), with
    # the answer and the reason in the new request.
    broken = sum(r.fault == "bad_json" for r in requests)
    asked_again = broken - (50 - len(valid))
    assert broken > 0 and len(requests) == 50 + asked_again
    reasks = [r for r in requests if any(role == "assistant" for role, _ in r.texts)]
    assert len(reasks) == asked_again
    for r in reasks:
        answer = next(text for role, text in r.texts if role == "assistant")
        assert answer.startswith("{") and "cannot be used" in r.texts[-1][1]
    assert f"{asked_again} retries" in result.stdout
    # The schema went as response_format json_schema, and is stated in the system prompt.
    first = requests[0]
    assert first.params["response_format"]["type"] == "json_schema"
    assert first.params["response_format"]["json_schema"]["schema"] == SCHEMA
    assert json.dumps(SCHEMA, sort_keys=True) in (first.system or "")


@pytest.mark.parametrize("mode", ["json_object", "prompt"])
def test_servers_without_json_schema_are_asked_their_way(tmp_path, server, mode):
    data, _ = make_dataset(tmp_path, 3)
    out = tmp_path / "out.jsonl"
    result = run_capflow(*_args(server, data, out, f"prompt.output_mode={mode}"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for request in server.requests:
        expected = {"type": "json_object"} if mode == "json_object" else None
        assert request.params.get("response_format") == expected
        assert "JSON Schema" in (request.system or "")
    for row in read_rows(out):
        jsonschema.validate(row["caption"], SCHEMA)


def test_a_row_that_never_validates_fails_with_its_answer_and_a_rerun_asks_anew(tmp_path):
    data, _ = make_dataset(tmp_path, 3)
    out = tmp_path / "out.jsonl"
    with FakeOpenAIServer(faults=FaultConfig(rate_bad_json=1.0)) as server:
        args = _args(server, data, out, "pipeline.steps.caption.max_reasks=1")
        result = run_capflow(*args, cwd=tmp_path)
        assert result.returncode == 1
        assert len(server.requests) == 3 * 2  # the first answer and one more try each
        for row in read_rows(out):
            assert row["_error"]["type"] == "InvalidAnswer"
            assert row["_error"]["text"].startswith('{"caption": ')
        # Refused answers were not cached: once the server answers well, the rows are asked
        # again and captioned.
        server.faults = FaultInjector(FaultConfig())
        server.reset()
        again = run_capflow(*args, cwd=tmp_path)
        assert again.returncode == 0, again.stdout
        assert len(server.requests) == 3
    assert all(isinstance(row["caption"], dict) for row in read_rows(out))


def test_a_schema_that_is_not_one_is_a_one_line_error(tmp_path, server):
    data, _ = make_dataset(tmp_path, 1)
    result = run_capflow(*_args(server, data, tmp_path / "o.jsonl", "prompt.schema={type: objekt}"),
                         cwd=tmp_path)
    assert result.returncode == 2 and server.requests == []
    assert "output_schema is not a valid JSON Schema" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_answers_wrapped_in_fences_or_prose_are_found():
    schema = OutputSchema({"type": "object", "required": ["a"]})
    assert schema.parse('```json\n{"a": 1}\n```') == {"a": 1}
    assert schema.parse('Here it is: {"a": [1, 2]} Hope this helps.') == {"a": [1, 2]}
    with pytest.raises(InvalidAnswer, match="not JSON"):
        schema.parse('{"a": ')
    with pytest.raises(InvalidAnswer, match="at the top level: 'a' is a required property"):
        schema.parse('{"b": 1}')
    with pytest.raises(ConfigError, match="output_mode must be one of"):
        OutputSchema({"type": "object"}, mode="xml")
