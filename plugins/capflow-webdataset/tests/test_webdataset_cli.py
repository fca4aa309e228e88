"""storage=webdataset through the real ``capflow`` command, against the kit's loopback
OpenAI-compatible server, which answers each request with the size and mean colour of the
image it was sent (``describe_image``): so each caption says which image it is of."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

from shardmaker import make_shards, read_tar

from capflow.testing.server import FakeOpenAIServer, describe_image

GOOD = ["000000000", "000000001", "000000002", "000010000", "000010003"]
CORRUPT, NO_IMAGE = "000010001", "000010002"


def run(capflow_cli: Callable[..., subprocess.CompletedProcess[str]], server: FakeOpenAIServer,
        *overrides: str) -> subprocess.CompletedProcess[str]:
    """``capflow storage=webdataset`` against ``server``."""
    return capflow_cli("storage=webdataset", f"api_url={server.base_url}", "model_name=m",
                       "progress=false", *overrides)


def test_shards_in_captioned_shard_out_then_jsonl(openai_server, capflow_cli, tmp_path):
    samples = make_shards(tmp_path / "shards")
    result = run(capflow_cli, openai_server, "input=shards/", "output=out.tar")
    # Two rows fail (exit status 1), alone; the five others are captioned.
    assert result.returncode == 1, result.stderr
    assert "rows      7 of 7: 5 done, 2 failed" in result.stdout

    # The server was sent each good sample's own image, once, and nothing for the others.
    expected = {key: describe_image(samples[key].image) for key in GOOD}
    assert sorted(r.images[0] for r in openai_server.requests) == sorted(expected.values())
    assert all(len(r.images) == 1 for r in openai_server.requests)

    members = read_tar(tmp_path / "out.tar")
    for key in GOOD:
        s = samples[key]
        assert [n for n in members if n.startswith(key + ".")] == [
            f"{key}.{s.ext}", f"{key}.json", f"{key}.txt"]
        assert members[f"{key}.{s.ext}"] == s.image  # the image, byte for byte
        meta = json.loads(members[f"{key}.json"])
        assert meta == {**s.metadata, "caption": expected[key], "key": key, "shard": s.shard,
                        "txt": s.text}  # the original caption stays, as txt
        assert members[f"{key}.txt"].decode() == expected[key]

    # The sample whose image is broken fails alone, its image and metadata kept.
    bad = samples[CORRUPT]
    assert members[f"{CORRUPT}.jpg"] == bad.image and f"{CORRUPT}.txt" not in members
    bad_meta = json.loads(members[f"{CORRUPT}.json"])
    assert bad_meta["url"] == bad.metadata["url"]
    assert bad_meta["_error"]["type"] == "ImageUnreadable"
    # The sample without an image is a failed row that says which sample it was.
    [failed] = [n for n in members if n.startswith("_failed_")]
    assert failed == "_failed_000005.json"
    message = json.loads(members[failed])["_error"]["message"]
    assert f"000001.tar: sample {NO_IMAGE} has no image" in message

    # Run again: everything is done already, nothing is sent, the output is the same.
    sent = len(openai_server.requests)
    again = run(capflow_cli, openai_server, "input=shards/", "output=out.tar")
    assert again.returncode == 1, again.stderr
    assert len(openai_server.requests) == sent
    assert read_tar(tmp_path / "out.tar").keys() == members.keys()

    # JSON Lines out: the answers come from the cache; images are references, not bytes.
    jsonl = run(capflow_cli, openai_server, "input=shards/", "output=out.jsonl")
    assert jsonl.returncode == 1, jsonl.stderr
    assert len(openai_server.requests) == sent
    text = (tmp_path / "out.jsonl").read_text()
    assert "base64" not in text
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == 7
    by_key = {row["key"]: row for row in rows if "key" in row}
    for key in GOOD:
        s = samples[key]
        assert by_key[key]["image"] == f"{s.shard}/{key}.{s.ext}"
        assert by_key[key]["caption"] == expected[key]
        assert by_key[key]["url"] == s.metadata["url"]
    assert by_key[CORRUPT]["image"] == f"000001.tar/{CORRUPT}.jpg"
    assert by_key[CORRUPT]["_error"]["type"] == "ImageUnreadable"
    assert by_key[CORRUPT]["caption"] == samples[CORRUPT].metadata["caption"]  # not captioned


def test_brace_pattern_in_and_sharded_output(openai_server, capflow_cli, tmp_path):
    samples = make_shards(tmp_path / "shards")
    pattern = "input='shards/{000000..000001}.tar'"
    result = run(capflow_cli, openai_server, pattern, "output='out/{shard}.tar'")
    assert result.returncode == 1, result.stderr
    assert len(openai_server.requests) == len(GOOD)
    # One output shard per input shard, of the same name, holding that shard's samples.
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["000000.tar",
                                                                         "000001.tar"]
    for shard in ("000000.tar", "000001.tar"):
        keys = {n.split(".")[0] for n in read_tar(tmp_path / "out" / shard)}
        assert keys == {k for k, s in samples.items() if s.shard == shard and k != NO_IMAGE} \
            | ({"_failed_000005"} if shard == "000001.tar" else set())

    # Numbered shards of at most 3 samples; the answers come from the cache.
    numbered = run(capflow_cli, openai_server, pattern, "output='num/{shard}.tar'",
                   "storage.samples_per_shard=3")
    assert numbered.returncode == 1, numbered.stderr
    assert len(openai_server.requests) == len(GOOD)
    shards = sorted((tmp_path / "num").glob("*.tar"))
    assert [p.name for p in shards] == ["000000.tar", "000001.tar", "000002.tar"]
    counts = [len({n.split(".")[0] for n in read_tar(p)}) for p in shards]
    assert counts == [3, 3, 1]
    captions = [m.decode() for p in shards for n, m in read_tar(p).items() if n.endswith(".txt")]
    assert sorted(captions) == sorted(describe_image(samples[k].image) for k in GOOD)


def test_unusable_input_stops_with_one_line(capflow_cli, tmp_path):
    (tmp_path / "empty").mkdir()
    result = capflow_cli("storage=webdataset", "input=empty", "output=o.tar",
                         "api_url=http://127.0.0.1:9/v1")
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("capflow: error: no tar shards in empty (a webdataset folder holds"
                             " 000000.tar, 000001.tar, ...)\n")


def test_the_option(capflow_config):
    cfg = capflow_config("storage=webdataset", "input=shards/", "image.max_file_bytes=1000")
    assert cfg.storage.path == "shards/"
    assert cfg.storage.image_key == "image"
    assert cfg.storage.caption_key == "caption"
    assert cfg.storage.max_image_bytes == 1000  # follows image.max_file_bytes
    assert cfg.storage._target_ == "capflow_webdataset.WebDatasetStorage"
