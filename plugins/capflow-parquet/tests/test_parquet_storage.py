"""storage=parquet through the real capflow command against capflow's loopback OpenAI server,
with nothing but capflow's pytest kit (``openai_server``, ``capflow_cli``)."""

from __future__ import annotations

import datetime
import decimal
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

N_ROWS = 200
N_IMAGES = N_ROWS  # one image per row: every row is its own request


def png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


def size_of(index: int) -> tuple[int, int]:
    """Each image its own size: the server's answer names the size of the image it was sent."""
    return 40 + index, 30 + 2 * index


def typed_table(folder: Path) -> pa.Table:
    """200 rows of many column types; the images are files beside the dataset."""
    for i in range(N_IMAGES):
        (folder / f"img{i}.png").write_bytes(png(*size_of(i), (10 * i, 100, 200)))
    schema = pa.schema([
        ("id", pa.int32()),
        ("image", pa.string()),
        ("score", pa.float32()),
        ("tags", pa.list_(pa.string())),
        ("taken", pa.timestamp("ms", tz="UTC")),
        ("day", pa.date32()),
        ("price", pa.decimal128(10, 2)),
        ("meta", pa.struct([("source", pa.string()), ("views", pa.int64())])),
        ("blob", pa.binary()),
        ("flag", pa.bool_()),
        ("note", pa.large_string()),
    ], metadata={b"origin": b"test"})
    start = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)
    rows = {
        "id": list(range(N_ROWS)),
        "image": [f"img{i % N_IMAGES}.png" for i in range(N_ROWS)],
        "score": [i / 8 for i in range(N_ROWS)],
        "tags": [[f"t{i}", "x"] if i % 3 else [] for i in range(N_ROWS)],
        "taken": [start + datetime.timedelta(minutes=i) for i in range(N_ROWS)],
        "day": [datetime.date(2024, 1, 1) + datetime.timedelta(days=i) for i in range(N_ROWS)],
        "price": [decimal.Decimal(f"{i}.{i % 100:02d}") for i in range(N_ROWS)],
        "meta": [{"source": f"s{i % 4}", "views": i * 1000} for i in range(N_ROWS)],
        "blob": [bytes([i % 256, 0, 255]) for i in range(N_ROWS)],
        "flag": [i % 2 == 0 for i in range(N_ROWS)],
        "note": [None if i % 5 == 0 else f"note {i}" for i in range(N_ROWS)],
    }
    return pa.table(rows, schema=schema)


def test_200_rows_get_captions_and_keep_their_column_types(openai_server, capflow_cli,
                                                             tmp_path):
    table = typed_table(tmp_path)
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=64)
    result = capflow_cli("storage=parquet", "input=data.parquet", "output=out.parquet",
                         f"api_url={openai_server.base_url}", "model_name=m",
                         "image.prepare=false")
    assert result.returncode == 0, result.stderr
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.num_rows == N_ROWS
    for field in table.schema:  # every input column, with its type, its values
        assert out.schema.field(field.name).type == field.type, field.name
        assert out.column(field.name).equals(table.column(field.name)), field.name
    assert out.schema.metadata[b"origin"] == b"test"
    assert out.schema.field("caption").type == pa.string()
    captions = out.column("caption").to_pylist()
    for i, caption in enumerate(captions):  # each row's caption is about its own image
        width, height = size_of(i % N_IMAGES)
        assert f"{width}x{height}" in caption, (i, caption)
    assert "_error" not in out.schema.names  # no row failed
    assert len(openai_server.requests) == N_ROWS


def test_a_rerun_sends_nothing_and_writes_the_same_rows(openai_server, capflow_cli, tmp_path):
    pq.write_table(typed_table(tmp_path), tmp_path / "data.parquet")
    args = ("storage=parquet", "input=data.parquet", "output=out.parquet",
            f"api_url={openai_server.base_url}", "model_name=m")
    assert capflow_cli(*args).returncode == 0
    first = pq.read_table(tmp_path / "out.parquet")
    sent = len(openai_server.requests)
    again = capflow_cli(*args)
    assert again.returncode == 0, again.stderr
    assert len(openai_server.requests) == sent
    assert pq.read_table(tmp_path / "out.parquet").equals(first)


def test_hugging_face_image_structs_are_read_and_written_back(openai_server, capflow_cli,
                                                            tmp_path):
    """A ``datasets`` Parquet export: images embedded as ``{bytes, path}`` structs."""
    images = [png(*size_of(i), (200, 10 * i, 50)) for i in range(6)]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"image": {"_type": "Image"}, "label": {"dtype": "int64", "_type": "Value"}}
    table = pa.table(
        {"image": pa.array([{"bytes": b, "path": f"p{i}.png"} for i, b in enumerate(images)],
                           type=image_type),
         "label": pa.array(range(6), type=pa.int64())},
    ).replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, tmp_path / "train.parquet")
    result = capflow_cli("storage=parquet", "input=train.parquet", "output=out.parquet",
                         f"api_url={openai_server.base_url}", "model_name=m",
                         "image.prepare=false")
    assert result.returncode == 0, result.stderr
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.column("image").equals(table.column("image"))  # bytes and paths as they were
    for i, caption in enumerate(out.column("caption").to_pylist()):
        assert "{}x{}".format(*size_of(i)) in caption
    hf = json.loads(out.schema.metadata[b"huggingface"])["info"]["features"]
    assert hf["caption"] == {"dtype": "string", "_type": "Value"} and "image" in hf


def test_a_failed_row_is_kept_with_its_error(openai_server, capflow_cli, tmp_path):
    (tmp_path / "ok.png").write_bytes(png(33, 22, (1, 2, 3)))
    table = pa.table({"image": ["ok.png", "missing.png", "ok.png"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "data.parquet")
    result = capflow_cli("storage=parquet", "input=data.parquet", "output=out.parquet",
                         f"api_url={openai_server.base_url}", "model_name=m")
    assert result.returncode != 0 or "1 failed" in result.stdout + result.stderr
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["n"] for r in rows] == [1, 2, 3]
    assert rows[0]["caption"] and rows[2]["caption"]
    assert rows[1]["caption"] is None and rows[1]["_error"]["type"]
    assert rows[0]["_error"] is None


def test_a_folder_of_parquet_files_is_one_dataset(openai_server, capflow_cli, tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.png").write_bytes(png(21, 11, (9, 9, 9)))
    for part in range(3):
        pq.write_table(pa.table({"image": ["a.png"] * 4, "part": [part] * 4}),
                       tmp_path / "shards" / f"part-{part}.parquet")
    result = capflow_cli("storage=parquet", "input=shards", "output=out.jsonl",
                         f"api_url={openai_server.base_url}", "model_name=m")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["part"] for r in rows] == [0] * 4 + [1] * 4 + [2] * 4
    assert all("21x11" in r["caption"] for r in rows)


def test_bad_input_is_one_line_naming_the_problem(capflow_cli, tmp_path):
    (tmp_path / "fake.parquet").write_text("not parquet")
    result = capflow_cli("storage=parquet", "input=fake.parquet", "output=out.parquet",
                         "api_url=http://127.0.0.1:9/v1", "model_name=m")
    assert result.returncode == 2
    assert "cannot read" in result.stderr and "fake.parquet" in result.stderr
    pq.write_table(pa.table({"picture": ["a.png"]}), tmp_path / "data.parquet")
    result = capflow_cli("storage=parquet", "input=data.parquet", "output=out.parquet",
                         "api_url=http://127.0.0.1:9/v1", "model_name=m")
    assert result.returncode == 2
    assert "no column 'image'" in result.stderr and "picture" in result.stderr
    assert not (tmp_path / "out.parquet").exists()
