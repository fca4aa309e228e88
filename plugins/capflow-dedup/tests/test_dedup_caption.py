"""pipeline=dedup_caption end to end: the real ``capflow`` command against a loopback
OpenAI-compatible server. Near-duplicates are dropped and listed with the row they copy, only
the unique images are sent and captioned, and an unreadable image fails its row alone."""

from __future__ import annotations

import json
from pathlib import Path

from scenes import (
    brightened,
    data_uri,
    jpeg_bytes,
    resized,
    save,
    scene,
    size_of,
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def sent_sizes(server) -> list[tuple[int, int]]:  # noqa: ANN001 - the kit's FakeOpenAIServer
    """The pixel size of every image the server was sent (it records each as "WxH #rrggbb")."""
    sizes = [seen.split()[0] for rec in server.requests for seen in rec.images]
    return [(int(w), int(h)) for w, h in (size.split("x") for size in sizes)]


def make_photos(folder: Path) -> dict[str, tuple[int, int]]:
    """Four distinct scenes, three near-duplicates and one file that is no image; returns the
    distinct ones' names and sizes. In the folder's sorted order each original comes first."""
    originals = {}
    for seed in range(4):
        name = f"s{seed}.png"
        save(scene(seed, size_of(seed)), folder / name)
        originals[name] = size_of(seed)
    save(resized(scene(0, size_of(0))), folder / "s0_small.png")
    (folder / "s0_q40.jpg").write_bytes(jpeg_bytes(scene(0, size_of(0)), quality=40))
    save(brightened(scene(2, size_of(2))), folder / "s2_bright.png")
    (folder / "s3_broken.jpg").write_bytes(b"this is not a JPEG")
    return originals


def test_dedup_caption_drops_copies_and_captions_unique_photos_only(
        capflow_cli, openai_server, tmp_path):
    originals = make_photos(tmp_path / "photos")

    result = capflow_cli("pipeline=dedup_caption", "input=photos", "output=out.jsonl",
                         f"api_url={openai_server.base_url}", "progress=false")

    # Exit status 1: a row failed (the unreadable one); everything else went through.
    assert result.returncode == 1, result.stdout + result.stderr
    rows = {row["id"]: row for row in read_jsonl(tmp_path / "out.jsonl")}
    assert set(rows) == {*originals, "s3_broken.jpg"}
    for name, (width, height) in originals.items():
        assert rows[name]["caption"].startswith(f"{width}x{height} #"), rows[name]
        assert "_error" not in rows[name]
        assert len(rows[name]["phash"]) == 1 and len(rows[name]["phash"][0]) == 16
    broken = rows["s3_broken.jpg"]
    assert "caption" not in broken
    assert broken["_error"]["type"] == "ImageUnreadable"
    assert "s3_broken.jpg" in broken["_error"]["message"]
    assert "\n" not in broken["_error"]["message"]

    # Only the unique images were sent, each once.
    assert len(openai_server.requests) == len(originals)
    assert sorted(sent_sizes(openai_server)) == sorted(originals.values())

    # The copies are listed beside the output, each naming the row it duplicates.
    dropped = {row["id"]: row["_dropped"]
               for row in read_jsonl(tmp_path / "out.jsonl.dedup.dropped.jsonl")}
    assert set(dropped) == {"s0_small.png", "s0_q40.jpg", "s2_bright.png"}
    for name, original in [("s0_small.png", "s0.png"), ("s0_q40.jpg", "s0.png"),
                           ("s2_bright.png", "s2.png")]:
        record = dropped[name]
        assert record["step"] == "DedupStep"
        assert record["reason"].startswith(f"near-duplicate of {original}: phash distance ")
        assert record["duplicate_of"] == original and record["duplicate_of_id"] == original
        assert 0 <= record["distance"] <= 6
    assert "3 dropped" in result.stdout and "out.jsonl.dedup.dropped.jsonl" in result.stdout


def test_rows_of_paths_and_data_uris_with_the_step_configured(
        capflow_cli, openai_server, tmp_path):
    a, b = scene(10, (300, 220)), scene(11, (260, 260))
    save(a, tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "a_copy.jpg").write_bytes(jpeg_bytes(a, quality=50))
    b_uri = data_uri(b)
    rows = [
        {"id": "r0", "image": "imgs/a.png"},
        {"id": "r1", "image": b_uri},
        {"id": "r2", "image": "imgs/a_copy.jpg"},
        {"id": "r3", "image": data_uri(resized(b), "JPEG")},
        {"id": "r4", "image": "imgs/missing.png"},
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    result = capflow_cli("pipeline=dedup_caption", "input=rows.jsonl", "output=out.jsonl",
                         f"api_url={openai_server.base_url}", "progress=false",
                         "pipeline.steps.dedup.hash=dhash",
                         "pipeline.steps.dedup.output_hash_key=null",
                         "pipeline.steps.dedup.dropped_output=copies.jsonl")

    assert result.returncode == 1, result.stdout + result.stderr
    out = {row["id"]: row for row in read_jsonl(tmp_path / "out.jsonl")}
    assert set(out) == {"r0", "r1", "r4"}
    assert out["r0"]["caption"].startswith("300x220 #")
    assert out["r1"]["caption"].startswith("260x260 #")
    assert out["r4"]["_error"]["type"] == "ImageNotFound"
    assert not any("dhash" in row or "phash" in row for row in out.values())
    assert len(openai_server.requests) == 2

    dropped = {row["id"]: row["_dropped"] for row in read_jsonl(tmp_path / "copies.jsonl")}
    assert set(dropped) == {"r2", "r3"}
    assert dropped["r2"]["reason"].startswith(
        'near-duplicate of row id="r0" (imgs/a.png): dhash distance ')
    assert dropped["r3"]["duplicate_of_id"] == "r1"
    assert dropped["r3"]["duplicate_of"].startswith("data:image/png;base64,")
    assert len(dropped["r3"]["duplicate_of"]) <= 80  # a data: URI is shown cut short


def test_a_wrong_setting_is_a_one_line_error_before_anything_is_sent(
        capflow_cli, openai_server, tmp_path):
    save(scene(0, (64, 64)), tmp_path / "photos" / "x.png")
    result = capflow_cli("pipeline=dedup_caption", "input=photos",
                         f"api_url={openai_server.base_url}", "pipeline.steps.dedup.hash=md5")
    assert result.returncode == 2
    assert "hash must be one of phash, dhash, ahash, whash, not 'md5'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert openai_server.requests == []
