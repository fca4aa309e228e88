"""DedupStep's settings and the pipeline option, checked without a run: the config composed by
the kit's ``capflow_config``, the hashes against imagehash's own, wrong values refused."""

from __future__ import annotations

import json
from pathlib import Path

import imagehash
import pytest
from capflow_dedup import DedupStep
from capflow_dedup.hashing import hasher, to_hex
from scenes import jpeg_bytes, resized, save, scene

from capflow import FileStorage
from capflow.errors import ConfigError


def test_the_dedup_step_comes_before_the_caption_step(capflow_config):
    cfg = capflow_config("pipeline=dedup_caption")
    assert list(cfg.pipeline.steps) == ["dedup", "caption"]
    step = cfg.pipeline.steps.dedup
    assert step._target_ == "capflow_dedup.DedupStep"
    assert step.input_image_key == cfg.pipeline.steps.caption.input_image_key == "image"
    assert step.output_hash_key == "phash"
    assert step.image_io._target_ == "capflow.images.ImagePreparer"


def test_the_hash_field_follows_the_hash_chosen(capflow_config):
    cfg = capflow_config("pipeline=dedup_caption", "pipeline.steps.dedup.hash=dhash")
    assert cfg.pipeline.steps.dedup.output_hash_key == "dhash"


@pytest.mark.parametrize(("method", "function"), [
    ("phash", imagehash.phash), ("dhash", imagehash.dhash),
    ("ahash", imagehash.average_hash), ("whash", imagehash.whash)])
def test_hashes_are_imagehash_hashes(tmp_path, method, function):
    from PIL import Image

    path = save(scene(3, (200, 160)), tmp_path / "x.png")
    code = hasher(method, 8)(path.read_bytes(), "x.png")
    with Image.open(path) as img:
        assert to_hex(code, 64) == str(function(img, hash_size=8))


@pytest.mark.parametrize(("settings", "message"), [
    ({"hash": "md5"}, "hash must be one of phash, dhash, ahash, whash, not 'md5'"),
    ({"hash_size": 1}, "hash_size must be >= 2"),
    ({"hash": "whash", "hash_size": 6}, "power of 2 for whash"),
    ({"max_distance": -1}, "max_distance must be >= 0 and < 32"),
    ({"max_distance": 32}, "max_distance must be >= 0 and < 32"),
    ({"input_image_key": ""}, "needs input_image_key"),
    ({"output_hash_key": "image"}, "would replace the images it hashes"),
])
def test_wrong_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        DedupStep(**settings)


def test_rows_of_several_images_are_copies_when_every_image_is(tmp_path):
    a, b, c = (scene(seed, (160, 120)) for seed in (20, 21, 22))
    for name, img in {"a": a, "b": b, "c": c, "a2": resized(a), "b2": resized(b)}.items():
        save(img, tmp_path / f"{name}.png")
    (tmp_path / "a3.jpg").write_bytes(jpeg_bytes(a))
    rows = [{"id": 0, "image": ["a.png", "b.png"]},
            {"id": 1, "image": ["a2.png", "b2.png"]},   # both images copied: dropped
            {"id": 2, "image": ["a3.jpg", "c.png"]},    # only the first one: kept
            {"id": 3, "image": ["a3.jpg"]},             # one image, not two: kept
            {"id": 4, "image": "a2.png"},               # a copy of row 3's image: dropped
            {"id": 5}]                                  # no image: kept as it is
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    storage = FileStorage(str(tmp_path / "rows.jsonl"), cache_path=str(tmp_path / "steps"))

    summary = DedupStep(output_hash_key="hash").run(storage.step())

    assert (summary.done, summary.dropped, summary.failed) == (4, 2, 0)
    kept = [json.loads(line) for line in Path(summary.output).read_text().splitlines()]
    assert [row["id"] for row in kept] == [0, 2, 3, 5]
    assert [len(row["hash"]) for row in kept[:3]] == [2, 2, 1] and "hash" not in kept[3]
    dropped = [json.loads(line)
               for line in Path(summary.dropped_output).read_text().splitlines()]
    assert [(row["id"], row["_dropped"]["duplicate_of_id"]) for row in dropped] == [
        (1, 0), (4, 3)]
    assert dropped[0]["_dropped"]["reason"].startswith(
        "near-duplicate of row id=0 (a.png (+1 more)): phash distance ")
    assert summary.dropped_output == f"{summary.output}.dropped.jsonl"
