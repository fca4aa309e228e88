"""The prepared-image cache: a sweep's jobs, and later runs, prepare each photo once; the checks
of every file still run on each use, and a cache that cannot be used costs nothing but a
warning. Real JPEGs, a real SQLite file, the real console script."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import read_rows, run_capflow
from omegaconf import OmegaConf
from PIL import Image

from capflow.app import build
from capflow.errors import ConfigError, RowError
from capflow.image_cache import EncodedImage, PreparedImageCache
from capflow.images import ImagePreparer
from capflow.operators import Operator
from capflow.serving import Serving
from capflow.testing.server import describe_image

CONFIG = Path(__file__).resolve().parents[1] / "conf" / "config.yaml"


class CountingPreparer(ImagePreparer):
    """An ImagePreparer that counts the images it decodes."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.decoded = 0

    def _from_bytes(self, data: bytes, where: str) -> EncodedImage:
        self.decoded += 1
        return super()._from_bytes(data, where)


def photo(path: Path, colour: tuple[int, int, int] = (200, 40, 40),
          size: tuple[int, int] = (1600, 1200)) -> Path:
    """A JPEG larger than the default budget (1.2 MP), so preparing it shrinks it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    img.paste((255, 255, 255), (0, 0, size[0] // 4, size[1] // 4))
    img.save(path, "JPEG", quality=90)
    return path


def preparer(cache_path: Path | None, **kwargs: object) -> CountingPreparer:
    return CountingPreparer(cache_path=None if cache_path is None else str(cache_path), **kwargs)


def stored(cache_path: Path) -> list[tuple]:
    """(data length or None, bytes, used) of every entry, read straight from the file."""
    with sqlite3.connect(cache_path) as db:
        return db.execute("SELECT length(data), bytes, used FROM images ORDER BY rowid").fetchall()


# --- hits and misses --------------------------------------------------------------------------


def test_a_new_preparer_finds_the_photo_prepared_and_does_not_decode_it(tmp_path):
    photo(tmp_path / "a.jpg")
    cache = tmp_path / "cache" / "images.sqlite"
    first = preparer(cache)
    prepared = first.prepare("a.jpg", tmp_path)
    assert first.decoded == 1 and (prepared.width, prepared.height) == (1264, 948)
    second = preparer(cache)  # as the next job of a sweep builds its own
    again = second.prepare("a.jpg", tmp_path)
    assert second.decoded == 0
    assert second.image_cache is not None and second.image_cache.hits == 1
    assert again == prepared  # the same data URL, sizes and source size
    [(length, size, _)] = stored(cache)
    assert length == prepared.size and size >= length  # the JPEG's bytes, not its base64


def test_an_image_sent_as_it_is_is_kept_without_its_bytes(tmp_path):
    Image.new("RGB", (32, 24), (10, 20, 30)).save(tmp_path / "small.png")
    cache = tmp_path / "images.sqlite"
    prepared = preparer(cache).prepare("small.png", tmp_path)
    assert stored(cache)[0][0] is None  # the file holds those bytes already
    second = preparer(cache)
    assert second.prepare("small.png", tmp_path) == prepared and second.decoded == 0
    assert prepared.url.endswith(base64.b64encode((tmp_path / "small.png").read_bytes()).decode())


def test_one_preparer_shared_by_threads_stores_each_photo_once(tmp_path):
    for i in range(8):
        photo(tmp_path / f"{i}.jpg", (i * 30, 100, 50))
    cache = tmp_path / "images.sqlite"
    shared = preparer(cache)
    results: dict[int, object] = {}

    def work(i: int) -> None:
        results[i] = shared.prepare(f"{i % 8}.jpg", tmp_path)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 16 and len(stored(cache)) == 8
    later = preparer(cache)
    assert all(later.prepare(f"{i}.jpg", tmp_path) == results[i] for i in range(8))
    assert later.decoded == 0


_WRITER = """
import sys
from pathlib import Path
from capflow.images import ImagePreparer
p = ImagePreparer(cache_path=sys.argv[1])
for _ in range(3):
    for i in range(6):
        p.prepare(f"{i}.jpg", Path(sys.argv[2]))
print(p.image_cache.stored + p.image_cache.hits)
"""


def test_processes_share_one_cache_file(tmp_path):
    for i in range(6):
        photo(tmp_path / f"{i}.jpg", (i * 40, 10, 200))
    cache = tmp_path / "images.sqlite"
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(cache), str(tmp_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    for writer in writers:
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0 and "cannot be used" not in err, err
        assert int(out) >= 12  # the first pass may race the other process; the rest hit
    assert len(stored(cache)) == 6


# --- what makes a miss ------------------------------------------------------------------------


def test_a_changed_file_misses(tmp_path):
    path = photo(tmp_path / "a.jpg", (200, 40, 40))
    cache = tmp_path / "images.sqlite"
    before = preparer(cache).prepare("a.jpg", tmp_path)
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))  # touched only
    touched = preparer(cache)
    assert touched.prepare("a.jpg", tmp_path) == before and touched.decoded == 1
    photo(path, (40, 40, 200))  # rewritten in place: new size and colour
    rewritten = preparer(cache)
    after = rewritten.prepare("a.jpg", tmp_path)
    assert rewritten.decoded == 1 and after != before
    assert after == ImagePreparer().prepare("a.jpg", tmp_path)


@pytest.mark.parametrize("setting", [{"max_side": 512}, {"quality": 50}, {"format": "webp"},
                                     {"max_pixels": 300_000}, {"resample": "lanczos"}])
def test_a_setting_that_changes_the_result_misses(tmp_path, setting):
    photo(tmp_path / "a.jpg")
    cache = tmp_path / "images.sqlite"
    default = preparer(cache).prepare("a.jpg", tmp_path)
    changed = preparer(cache, **setting)
    assert changed.prepare("a.jpg", tmp_path) != default and changed.decoded == 1
    assert len(stored(cache)) == 2


@pytest.mark.parametrize("setting", [{"max_file_bytes": 10_000_000}, {"fetch_timeout": 3},
                                     {"fetch_urls": True}])
def test_a_setting_that_only_decides_what_may_be_read_still_hits(tmp_path, setting):
    photo(tmp_path / "a.jpg")
    cache = tmp_path / "images.sqlite"
    default = preparer(cache).prepare("a.jpg", tmp_path)
    other = preparer(cache, image_root=str(tmp_path), **setting)
    assert other.prepare("a.jpg", tmp_path) == default and other.decoded == 0


# --- the checks still run on a hit ------------------------------------------------------------


def test_a_cached_file_over_max_file_bytes_is_still_refused(tmp_path):
    path = photo(tmp_path / "a.jpg")
    cache = tmp_path / "images.sqlite"
    preparer(cache).prepare("a.jpg", tmp_path)
    strict = preparer(cache, max_file_bytes=path.stat().st_size - 1)
    with pytest.raises(RowError, match="more than image.max_file_bytes") as caught:
        strict.prepare("a.jpg", tmp_path)
    assert caught.value.kind == "ImageTooLarge" and strict.decoded == 0
    assert strict.image_cache is not None and strict.image_cache.hits == 0


def test_a_cached_file_outside_the_image_root_is_still_refused(tmp_path):
    photo(tmp_path / "photos" / "a.jpg")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    cache = tmp_path / "images.sqlite"
    preparer(cache, image_root=str(tmp_path)).prepare("../photos/a.jpg", data_dir)
    (data_dir / "link.jpg").symlink_to(tmp_path / "photos" / "a.jpg")
    for ref in ("../photos/a.jpg", "link.jpg"):  # the root is the dataset's folder now
        with pytest.raises(RowError, match="outside the image root") as caught:
            preparer(cache).prepare(ref, data_dir)
        assert caught.value.kind == "ImageOutsideRoot"


def test_a_cached_path_that_is_no_longer_a_regular_file_is_refused(tmp_path):
    path = photo(tmp_path / "a.jpg")
    cache = tmp_path / "images.sqlite"
    preparer(cache).prepare("a.jpg", tmp_path)
    path.unlink()
    path.mkdir()
    with pytest.raises(RowError, match="not a regular file"):
        preparer(cache).prepare("a.jpg", tmp_path)
    path.rmdir()
    with pytest.raises(RowError, match="image file not found") as caught:
        preparer(cache).prepare("a.jpg", tmp_path)
    assert caught.value.kind == "ImageNotFound"


# --- the size bound ---------------------------------------------------------------------------


def test_the_size_bound_evicts_the_least_recently_used(tmp_path):
    for name, colour in (("a", (200, 0, 0)), ("b", (0, 200, 0)), ("c", (0, 0, 200))):
        photo(tmp_path / f"{name}.jpg", colour)
    cache = tmp_path / "images.sqlite"
    probe = tmp_path / "probe.sqlite"
    preparer(probe).prepare("a.jpg", tmp_path)
    one = stored(probe)[0][1]  # what one entry counts, overhead included
    bound = int(one * 2.5)  # room for two entries, not three
    first = preparer(cache, cache_max_bytes=bound)
    first.prepare("a.jpg", tmp_path)
    first.prepare("b.jpg", tmp_path)
    with sqlite3.connect(cache) as db:  # both last used two hours ago
        db.execute("UPDATE images SET used = used - 7200")
    second = preparer(cache, cache_max_bytes=bound)
    second.prepare("a.jpg", tmp_path)  # a hit on an old entry moves its last use forward
    assert second.decoded == 0
    second.prepare("c.jpg", tmp_path)  # over the bound: b, the least recently used, goes
    assert second.image_cache is not None and second.image_cache.evicted == 1
    assert second.image_cache.size() <= bound and second.image_cache.entries() == 2
    third = preparer(cache, cache_max_bytes=bound)
    for name in ("a", "c", "b"):
        third.prepare(f"{name}.jpg", tmp_path)
    assert third.decoded == 1  # only b was prepared again


def test_a_hit_on_a_recent_entry_writes_nothing(tmp_path):
    photo(tmp_path / "a.jpg")
    cache = tmp_path / "images.sqlite"
    preparer(cache).prepare("a.jpg", tmp_path)
    [(_, _, used)] = stored(cache)
    preparer(cache).prepare("a.jpg", tmp_path)
    assert stored(cache)[0][2] == used


def test_an_image_too_large_for_the_bound_is_not_kept(tmp_path):
    photo(tmp_path / "a.jpg")
    cache = tmp_path / "images.sqlite"
    small = preparer(cache, cache_max_bytes=1000)
    assert small.prepare("a.jpg", tmp_path).size > 1000
    assert small.image_cache is not None and small.image_cache.entries() == 0


# --- no cache, and a cache that cannot be used ------------------------------------------------


def test_without_a_cache_no_file_is_made(tmp_path):
    photo(tmp_path / "a.jpg")
    cache = tmp_path / "cache" / "images.sqlite"
    off = preparer(cache, cache=False)
    assert off.image_cache is None
    off.prepare("a.jpg", tmp_path)
    nowhere = preparer(None)
    assert nowhere.image_cache is None
    nowhere.prepare("a.jpg", tmp_path)
    assert nowhere.decoded == 1 and not (tmp_path / "cache").exists()


def test_urls_and_data_uris_are_not_cached(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (2000, 1000), "red").save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    cache = tmp_path / "cache" / "images.sqlite"
    p = preparer(cache)
    assert p.prepare("https://example.com/a.jpg", tmp_path).url == "https://example.com/a.jpg"
    assert p.prepare(uri, tmp_path).width == 1536
    assert p.decoded == 1 and not cache.exists()  # never even opened


def test_the_cache_is_left_out_of_what_describes_the_preparation(tmp_path):
    # describe() is part of the journal's fingerprint: the cache must not restart a run.
    plain = ImagePreparer().describe()
    assert ImagePreparer(cache=False).describe() == plain
    assert ImagePreparer(cache_path=str(tmp_path / "x.sqlite"), cache_max_bytes=5).describe() \
        == plain
    assert not any(key.startswith("cache") for key in plain)


def _folder_in_place_of_a_file(tmp_path: Path) -> Path:
    (tmp_path / "taken").write_text("a file where the cache's folder should be")
    return tmp_path / "taken" / "images.sqlite"


def _corrupt_file(tmp_path: Path) -> Path:
    path = tmp_path / "images.sqlite"
    path.write_bytes(b"not a database, " * 512)
    return path


@pytest.mark.parametrize("make", [_folder_in_place_of_a_file, _corrupt_file])
def test_a_cache_that_cannot_be_used_warns_once_and_images_are_still_prepared(
        tmp_path, caplog, make):
    photo(tmp_path / "a.jpg")
    photo(tmp_path / "b.jpg", (0, 0, 0))
    cache = make(tmp_path)
    expected = ImagePreparer().prepare("a.jpg", tmp_path)
    p = preparer(cache)
    with caplog.at_level(logging.WARNING, logger="capflow"):
        assert p.prepare("a.jpg", tmp_path) == expected
        p.prepare("b.jpg", tmp_path)
        p.prepare("a.jpg", tmp_path)
    assert p.decoded == 3
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.getMessage().startswith(f"the prepared-image cache {cache} cannot be used")
    assert warning.getMessage().endswith("images are prepared without it")


def test_a_cache_that_fails_on_write_warns_once_and_images_are_still_prepared(
        tmp_path, caplog):
    photo(tmp_path / "a.jpg")
    photo(tmp_path / "b.jpg", (0, 0, 0))
    cache = tmp_path / "images.sqlite"
    p = preparer(cache)
    assert p.image_cache is not None and p.image_cache.entries() == 0  # opened and fine
    # The file may not grow by a page: SQLite's own "database or disk is full".
    db = p.image_cache._db
    assert db is not None
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
    with caplog.at_level(logging.WARNING, logger="capflow"):
        a = p.prepare("a.jpg", tmp_path)
        p.prepare("b.jpg", tmp_path)
    assert a.width == 1264 and p.decoded == 2
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "database or disk is full" in warning.getMessage()
    assert stored(cache) == []


# --- configuration ----------------------------------------------------------------------------


def test_the_config_keys_and_their_defaults():
    image = OmegaConf.load(CONFIG).image
    assert image.cache is True
    assert image._get_node("cache_path")._value() == (
        "${capflow.beside:${cache.path},images.sqlite}")  # in the response cache's folder
    assert image.cache_max_bytes == 2_000_000_000
    assert PreparedImageCache("x").max_bytes == image.cache_max_bytes
    with pytest.raises(ConfigError, match="image.cache_max_bytes must be > 0"):
        ImagePreparer(cache_max_bytes=0)


def _image_io(cfg) -> ImagePreparer:
    serving = build(cfg.serving, Serving, "serving")
    [step] = [build(node, Operator, name, serving=serving)
              for name, node in cfg.pipeline.steps.items()]
    return step.image_io


def test_the_cache_options_reach_the_preparer(capflow_config, tmp_path):
    default = _image_io(capflow_config()).image_cache
    assert default is not None and default.max_bytes == 2_000_000_000
    assert default.path == Path("cache_local", "images.sqlite").absolute()
    beside = _image_io(capflow_config("storage.cache_path=steps")).image_cache
    assert beside is not None and beside.path == Path("steps", "images.sqlite").absolute()
    moved = _image_io(capflow_config(f"image.cache_path={tmp_path / 'i.sqlite'}",
                                    "image.cache_max_bytes=12345")).image_cache
    assert moved is not None and (moved.path, moved.max_bytes) == (tmp_path / "i.sqlite", 12345)
    assert _image_io(capflow_config("image.cache=false")).image_cache is None
    assert _image_io(capflow_config("image.cache_path=null")).image_cache is None
    # It follows the response cache: moved with it, and none where that has no file.
    follows = _image_io(capflow_config(f"cache.path={tmp_path / 'r' / 'x.sqlite'}")).image_cache
    assert follows is not None and follows.path == tmp_path / "r" / "images.sqlite"
    assert _image_io(capflow_config("cache.path=null")).image_cache is None


# --- the console script: a sweep, then another run ---------------------------------------------


def _photo_dataset(root: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        photo(root / "photos" / f"{i}.jpg", (40 * i, 120, 200 - 30 * i))
        rows.append({"id": str(i), "image": f"photos/{i}.jpg"})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "data.jsonl"


def test_a_sweep_prepares_each_photo_once_and_the_next_run_reuses_them(server, tmp_path):
    data = _photo_dataset(tmp_path, 4)
    common = [f"input={data}", "output=out.jsonl", f"api_url={server.base_url}", "model_name=m"]
    sweep = run_capflow("-m", "prompt=concise,detailed", *common, cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr
    cache = tmp_path / "cache_local" / "images.sqlite"
    assert cache.exists() and (tmp_path / "cache_local" / "responses.sqlite").exists()
    entries = stored(cache)
    assert len(entries) == 4 and all(length for length, _, _ in entries)
    assert len(server.requests) == 8  # two prompts: every row asked twice
    images: dict[str, list[str]] = {}  # each job's images, whatever order they went in
    for r in server.requests:
        images.setdefault(r.system, []).extend(r.images)
    assert len(images) == 2 and len({json.dumps(sorted(v)) for v in images.values()}) == 1
    outputs = sorted(tmp_path.glob("multirun/**/out.jsonl"))
    assert len(outputs) == 2 and all(len(read_rows(p)) == 4 for p in outputs)
    real = {r["id"]: r["caption"] for r in read_rows(outputs[0])}
    assert real["0"].startswith("1264x948 #")

    # Another run finds the photos in the cache and sends what it holds, without decoding
    # them: put a marker image in place of every entry to see it is what gets sent.
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(buf, "JPEG", quality=95)
    marker = buf.getvalue()
    with sqlite3.connect(cache) as db:
        db.execute("UPDATE images SET data=?, width=8, height=6", (marker,))
    again = run_capflow(*common, "prompt=alt_text", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert [r["caption"] for r in read_rows(tmp_path / "out.jsonl")] == [
        describe_image(marker)] * 4
    assert len(server.requests) == 12 and len(stored(cache)) == 4

    # image.cache=false: every photo prepared afresh, the cache file untouched.
    off = run_capflow(*common, "prompt=seed", "image.cache=false", "output=off.jsonl",
                      cwd=tmp_path)
    assert off.returncode == 0, off.stderr
    assert {r["id"]: r["caption"] for r in read_rows(tmp_path / "off.jsonl")} == real
    assert [length for length, _, _ in stored(cache)] == [len(marker)] * 4
