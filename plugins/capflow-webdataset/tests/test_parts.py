"""The parts of capflow-webdataset on their own: reading shards (damaged ones too), data URIs,
brace patterns."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest
from capflow_webdataset.datauri import data_uri_ext, from_data_uri, to_data_uri
from capflow_webdataset.reader import SampleReader, split_name
from capflow_webdataset.shards import expand_braces, find_shards
from capflow_webdataset.storage import WebDatasetStorage
from shardmaker import image_bytes, make_shards

from capflow import ConfigError, RowError


def test_member_names_split_the_webdataset_way():
    assert split_name("000000001.jpg") == ("000000001", "jpg")
    assert split_name("./part/a.seg.png") == ("part/a", "seg.png")
    assert split_name("part/.hidden.jpg") is None
    assert split_name("README") is None


def test_rows_carry_metadata_key_shard_txt_and_image(tmp_path):
    samples = make_shards(tmp_path)
    rows = list(SampleReader().rows(find_shards(str(tmp_path))))
    assert len(rows) == 7
    first = rows[0]
    s = samples["000000000"]
    assert first == {**s.metadata, "key": s.key, "shard": "000000.tar", "txt": s.text,
                     "image": to_data_uri(s.image, "jpg")}
    assert from_data_uri(first["image"]) == (s.image, "jpg")
    assert isinstance(rows[5], RowError) and "000010002 has no image" in str(rows[5])


def test_jpeg_members_keep_their_extension():
    uri = to_data_uri(b"\xff\xd8", "jpeg")
    assert uri.startswith("data:image/jpeg;ext=jpeg;base64,")
    assert data_uri_ext(uri) == "jpeg" and from_data_uri(uri) == (b"\xff\xd8", "jpeg")
    assert data_uri_ext(to_data_uri(b"x", "jpg")) == "jpg"
    assert data_uri_ext("images/a.jpg") is None and from_data_uri(["a"]) is None


def test_a_shard_cut_short_ends_with_one_error(tmp_path):
    make_shards(tmp_path)
    whole = (tmp_path / "000000.tar").read_bytes()
    for cut in (3000, 4608):  # inside a member's data; at a member's boundary
        (tmp_path / "cut.tar").write_bytes(whole[:cut])
        rows = list(SampleReader().shard_rows(tmp_path / "cut.tar"))
        assert isinstance(rows[-1], RowError), rows[-1]
        assert "cut.tar: the shard breaks off at sample" in str(rows[-1])
        assert all(isinstance(r, dict) for r in rows[:-1])


def test_compressed_shards_and_size_cap(tmp_path):
    make_shards(tmp_path)
    (tmp_path / "z.tar.gz").write_bytes(gzip.compress((tmp_path / "000000.tar").read_bytes()))
    rows = list(SampleReader(max_image_bytes=200).shard_rows(tmp_path / "z.tar.gz"))
    assert [r["key"] if isinstance(r, dict) else r.kind for r in rows] == [
        "ImageTooLarge", "000000001", "000000002"]  # the JPEG is 600-odd bytes


def test_a_sample_with_a_bad_json_fails_alone(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in [("a.png", image_bytes((8, 8), (1, 2, 3), "png")), ("a.json", b"{no"),
                           ("b.png", image_bytes((9, 9), (1, 2, 3), "png")), ("b.json", b"[1]"),
                           ("c.png", image_bytes((7, 7), (1, 2, 3), "png"))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows = list(SampleReader().shard_rows(tmp_path / "s.tar"))
    assert [str(r) if isinstance(r, RowError) else r["key"] for r in rows] == [
        "s.tar: a.json is not valid JSON: Expecting property name enclosed in double quotes:"
        " line 1 column 2 (char 1)", "s.tar: b.json is not a JSON object", "c"]


def test_brace_patterns():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    with pytest.raises(ConfigError, match="neither a range"):
        expand_braces("s/{x}.tar")


@pytest.mark.parametrize(("path", "output", "options", "message"), [
    ("notes.tar", "o.tar", {}, "not a tar file: notes.tar"),
    ("shards/{000000..000002}.tar", "o.tar", {},
     "shard not found: shards/000002.tar (from the input pattern shards/{000000..000002}.tar)"),
    ("missing", "o.tar", {}, "input not found: missing"),
    ("shards", "o.csv", {}, "storage=webdataset writes .tar, .jsonl or 'out/{shard}.tar' outputs"),
    ("shards", "o.tar", {"samples_per_shard": 2}, "needs an output name with {shard}"),
    ("shards", "o/{shard}/{x}.tar", {}, "the only placeholder is {shard}, in the file name"),
])
def test_what_cannot_be_read_or_written_is_one_line(tmp_path, monkeypatch, path, output,
                                                     options, message):
    monkeypatch.chdir(tmp_path)
    make_shards(tmp_path / "shards")
    (tmp_path / "notes.tar").write_text("not a tar file at all\n" * 40)
    view = WebDatasetStorage(path, cache_path=str(tmp_path / "cache"), **options).step(output)
    with pytest.raises(ConfigError) as caught:
        view.check()
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_count_comes_from_img2datasets_stats_files(tmp_path):
    make_shards(tmp_path / "shards")
    storage = WebDatasetStorage(str(tmp_path / "shards"))
    assert storage.count_rows() == 7  # 3 + 4, without reading a shard
    (tmp_path / "shards" / "000001_stats.json").unlink()
    assert storage.count_rows() is None  # unknown rather than wrong
