"""FileStorage reads JSON arrays and JSON Lines as streams and writes rows back unchanged."""

from __future__ import annotations

import io
import json

import pytest

from capflow.errors import ConfigError
from capflow.rows import Row
from capflow.storage import FileStorage, json_stream
from capflow.storage.json_stream import iter_json_array


def test_json_array_streams_across_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(json_stream, "_CHUNK", 7)  # tiny chunks: every row spans several
    rows = [{"id": f"{i:04d}", "n": 12345678901234567890 + i, "f": 1e5, "s": "a/b"}
            for i in range(50)]
    text = json.dumps(rows, indent=2)
    got = list(iter_json_array(io.StringIO(text), "t.json"))
    assert [value for value, _ in got] == rows
    assert all(json.loads(raw) == value for value, raw in got)


def test_top_level_numbers_are_not_cut_at_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(json_stream, "_CHUNK", 3)
    assert [v for v, _ in iter_json_array(io.StringIO("[12345, 678]"), "t")] == [12345, 678]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": 1}', "expected a JSON array"),
        ('[{"a": 1}', "not closed"),
        ('[{"a": 1} {"b": 2}]', "expected ',' or ']' after row 1"),
        ('[{"a": 1}, {"b": }]', "row 2 is not valid JSON"),
    ],
)
def test_broken_json_arrays_are_one_line_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        list(iter_json_array(io.StringIO(text), "t.json"))


def test_jsonl_bad_line_becomes_an_error_row_not_a_crash(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "1"}\nnot json\n\n[1, 2]\n{"id": "2"}\n')
    rows = list(FileStorage(str(path)).step().read())
    assert [r.data.get("id") for r in rows] == ["1", None, None, "2"]
    assert rows[1].error.startswith(f"{path}:2: not valid JSON")
    assert rows[2].error == f"{path}:4: a row must be a JSON object"
    assert rows[1].data == {"_raw": "not json"}


def test_row_output_keeps_every_field_byte_for_byte():
    raw = '{"id": "0012", "x": 1e5, "p": "a/b", "u": "caf\\u00e9", "n": null}'
    row = Row(0, json.loads(raw), raw)
    assert row.with_fields({"caption": "é/x"}) == raw[:-1] + ', "caption": "é/x"}'
    assert Row(0, {}, "{}").with_fields({"c": 1}) == '{"c": 1}'


def test_existing_output_key_is_replaced_not_duplicated():
    raw = '{"id": "1", "caption": "old"}'
    line = Row(0, json.loads(raw), raw).with_fields({"caption": "new"})
    assert json.loads(line) == {"id": "1", "caption": "new"} and line.count("caption") == 1


def test_pretty_printed_rows_fold_to_one_line_with_values_intact():
    raw = '{\n  "id": "0012",\n  "image": [\n    "a b.png"\n  ]\n}'
    line = Row(0, json.loads(raw), raw).with_fields({"caption": "c"})
    assert line == '{"id": "0012", "image": ["a b.png"], "caption": "c"}'


def test_steps_chain_files_and_resolve_images_from_the_dataset(tmp_path):
    data = tmp_path / "sub" / "d.json"
    data.parent.mkdir()
    data.write_text('[{"id": "1"}]')
    storage = FileStorage(str(data), cache_path=str(tmp_path / "c"), file_name_prefix="p",
                          cache_type="json")
    first, second = storage.step(), storage.step()
    assert first.input_path == str(data)
    assert first.output_path == str(tmp_path / "c" / "p_step1.json")
    assert second.input_path == first.output_path
    assert second.base_dir == data.parent.resolve()
    first.write(['{"id": "1", "caption": "x"}'])
    assert json.loads((tmp_path / "c" / "p_step1.json").read_text()) == [
        {"id": "1", "caption": "x"}
    ]
    assert [r.data for r in second.read()] == [{"id": "1", "caption": "x"}]
    assert storage.step(output=str(tmp_path / "o.jsonl")).output_path == str(tmp_path / "o.jsonl")


def test_missing_input_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="input file not found: .*nope.json"):
        list(FileStorage(str(tmp_path / "nope.json")).step().read())
