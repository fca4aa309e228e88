"""Image sources, preparation to a budget, and bad inputs that cost no request."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_image, read_rows, run_capflow
from PIL import Image

from capflow.errors import ConfigError, RowError
from capflow.images import ImagePreparer, estimate_image_tokens
from capflow.testing.server import describe_image


def _decoded(prepared) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(prepared.url.split(",", 1)[1])))


def _photo(path: Path, size=(4000, 3000), orientation: int | None = None) -> bytes:
    """A noisy, textured photo-like JPEG: red in its top half, blue in its bottom half."""
    w, h = size
    noise = Image.effect_noise(size, 60).convert("RGB")
    base = Image.new("RGB", size, (200, 40, 40))
    base.paste((40, 40, 200), (0, h // 2, w, h))
    img = Image.blend(base, noise, 0.35)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    img.save(path, "JPEG", quality=90, exif=exif.tobytes())
    return path.read_bytes()


def test_a_12mp_photo_is_sent_small_upright_and_within_budget(tmp_path):
    # Stored sideways with orientation 6 ("rotate 90 clockwise to view"): upright it is
    # 3000 wide and 4000 tall, red on its right side.
    raw = _photo(tmp_path / "p.jpg", orientation=6)
    prepared = ImagePreparer(max_side=1536, max_pixels=None).prepare("p.jpg", tmp_path)
    assert prepared.size * 10 <= len(raw)
    img = _decoded(prepared)
    assert img.size == (1152, 1536) == (prepared.width, prepared.height)
    left, right = img.getpixel((100, 768)), img.getpixel((1050, 768))
    assert right[0] > right[2] and left[2] > left[0]  # red right, blue left: rotated correctly


def test_the_server_receives_the_prepared_size(server, tmp_path):
    _photo(tmp_path / "p.jpg", size=(4000, 3000), orientation=6)
    (tmp_path / "d.jsonl").write_text('{"image": "p.jpg"}\n')
    result = run_capflow(f"input={tmp_path / 'd.jsonl'}", f"output={tmp_path / 'o.jsonl'}",
                         f"api_url={server.base_url}", "model_name=m", "image.max_side=1536",
                         "image.max_pixels=null", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert server.requests[0].images[0].startswith("1152x1536 ")


def test_images_within_budget_are_sent_unchanged(tmp_path):
    data = make_image(tmp_path / "small.png", 5)
    prepared = ImagePreparer().prepare("small.png", tmp_path)
    assert prepared.url == "data:image/png;base64," + base64.b64encode(data).decode()


def test_max_pixels_bounds_the_area_and_never_upscales(tmp_path):
    Image.new("RGB", (2000, 2000), "red").save(tmp_path / "sq.png")
    prepared = ImagePreparer(max_side=None, max_pixels=1_000_000).prepare("sq.png", tmp_path)
    assert (prepared.width, prepared.height) == (1000, 1000)
    assert prepared.url.startswith("data:image/jpeg;")
    Image.new("RGB", (10, 10), "red").save(tmp_path / "tiny.png")
    assert ImagePreparer(max_side=4000).prepare("tiny.png", tmp_path).width == 10


@pytest.mark.parametrize(("fmt", "mime"), [("png", "image/png"), ("webp", "image/webp")])
def test_output_format_is_configurable(tmp_path, fmt, mime):
    Image.new("RGB", (400, 300), "green").save(tmp_path / "a.jpg")
    prepared = ImagePreparer(max_side=200, format=fmt).prepare("a.jpg", tmp_path)
    assert prepared.url.startswith(f"data:{mime};") and _decoded(prepared).size == (200, 150)


def test_keep_png_and_quality(tmp_path):
    Image.new("RGBA", (400, 300), (0, 0, 0, 0)).save(tmp_path / "t.png")
    kept = ImagePreparer(max_side=200, keep_png=True).prepare("t.png", tmp_path)
    assert kept.url.startswith("data:image/png;") and _decoded(kept).mode == "RGBA"
    _photo(tmp_path / "p.jpg", size=(800, 600))
    low = ImagePreparer(max_side=400, quality=30).prepare("p.jpg", tmp_path)
    high = ImagePreparer(max_side=400, quality=95).prepare("p.jpg", tmp_path)
    assert low.size < high.size


@pytest.mark.parametrize(
    ("make", "expected_mode"),
    [
        (lambda: Image.new("CMYK", (600, 400), (0, 255, 255, 0)), "RGB"),
        (lambda: Image.new("I;16", (600, 400), 40000), "L"),
        (lambda: Image.new("LA", (600, 400), (128, 255)), "RGB"),
    ],
    ids=["cmyk", "16-bit", "grey-alpha"],
)
def test_modes_the_api_cannot_take_are_converted(tmp_path, make, expected_mode):
    img = make()
    img.save(tmp_path / "x.tiff")
    prepared = ImagePreparer(max_side=300).prepare("x.tiff", tmp_path)
    assert _decoded(prepared).mode == expected_mode


def test_transparency_goes_onto_white_for_jpeg(tmp_path):
    img = Image.new("P", (600, 400), 0)
    img.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    decoded = _decoded(ImagePreparer(max_side=300).prepare("p.png", tmp_path))
    assert decoded.mode == "RGB" and decoded.getpixel((10, 10)) >= (250, 250, 250)


def test_animation_sends_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    decoded = _decoded(ImagePreparer().prepare("a.gif", tmp_path)).convert("RGB")
    red, _, blue = decoded.getpixel((5, 5))
    assert red > 200 and blue < 50


def test_prepare_false_sends_files_as_they_are(tmp_path):
    raw = _photo(tmp_path / "p.jpg", size=(800, 600))
    prepared = ImagePreparer(prepare=False, max_side=100).prepare("p.jpg", tmp_path)
    assert base64.b64decode(prepared.url.split(",")[1]) == raw


@pytest.fixture
def bad_inputs(tmp_path) -> Path:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    make_image(root / "images" / "good.png", 1)
    good = (root / "images" / "good.png").read_bytes()
    (root / "images" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "images" / "text.png").write_text("hello")
    (root / "images" / "zero.png").write_bytes(b"")
    Image.new("1", (10_000, 10_000)).save(root / "images" / "bomb.png")
    (tmp_path / "secret.png").write_bytes(good)
    os.symlink(tmp_path / "secret.png", root / "images" / "link.png")
    return root


BAD = {
    "./images/missing.png": "ImageNotFound",
    "./images/truncated.png": "ImageUnreadable",
    "./images/text.png": "ImageUnreadable",
    "./images/zero.png": "ImageUnreadable",
    "./images/bomb.png": "ImageTooLarge",
    "../secret.png": "ImageOutsideRoot",
    "./images/link.png": "ImageOutsideRoot",
    "/etc/passwd": "ImageOutsideRoot",
    "file:///etc/passwd": "UnsupportedScheme",
    "ftp://127.0.0.1/x.png": "UnsupportedScheme",
}


def test_each_bad_input_is_a_row_error_and_costs_no_request(server, bad_inputs, tmp_path):
    rows = [{"id": ref, "image": [ref]} for ref in BAD] + [{"id": "ok", "image": "images/good.png"}]
    data = bad_inputs / "d.json"
    data.write_text(json.dumps(rows))
    result = run_capflow(f"input={data}", f"output={tmp_path / 'o.jsonl'}",
                         f"api_url={server.base_url}", "model_name=m", "prompt=concise",
                         cwd=tmp_path)
    assert result.returncode == 1
    written = {r["id"]: r for r in read_rows(tmp_path / "o.jsonl")}
    for ref, kind in BAD.items():
        assert written[ref]["_error"]["type"] == kind, (ref, written[ref]["_error"])
    assert "caption" in written["ok"]
    assert len(server.requests) == 1


def test_image_root_widens_what_may_be_read(bad_inputs, tmp_path):
    assert ImagePreparer(image_root=str(tmp_path)).prepare("../secret.png", bad_inputs).size
    with pytest.raises(RowError, match="outside the image root"):
        ImagePreparer().prepare("../secret.png", bad_inputs)


@pytest.fixture
def image_host(tmp_path) -> Iterator[str]:
    """A loopback static file server for URL images."""
    (tmp_path / "web").mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(tmp_path / "web"))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("fetch", [False, True], ids=["pass-through", "fetched"])
def test_several_images_urls_and_data_uris_arrive_in_order(server, tmp_path, image_host, fetch):
    a = make_image(tmp_path / "a.png", 1)
    b = make_image(tmp_path / "web" / "b.png", 2)
    c = make_image(tmp_path / "c.png", 3)
    data_uri = "data:image/png;base64," + base64.b64encode(c).decode()
    url = f"{image_host}/b.png"
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": ["a.png", url, data_uri]}) + "\n")
    result = run_capflow(f"input={tmp_path / 'd.jsonl'}", f"output={tmp_path / 'o.jsonl'}",
                         f"api_url={server.base_url}", "model_name=m", "prompt=concise",
                         f"image.fetch_urls={str(fetch).lower()}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    middle = describe_image(b) if fetch else f"url {url}"
    assert server.requests[0].images == [describe_image(a), middle, describe_image(c)]


def test_fetch_limits(tmp_path, image_host):
    make_image(tmp_path / "web" / "b.png", 2)
    with pytest.raises(RowError, match="larger than image.fetch_max_bytes=10"):
        ImagePreparer(fetch_urls=True, fetch_max_bytes=10).prepare(f"{image_host}/b.png", tmp_path)
    with pytest.raises(RowError, match="cannot download"):
        ImagePreparer(fetch_urls=True, fetch_timeout=2).prepare(f"{image_host}/none.png", tmp_path)


def test_dry_run_reports_estimated_image_tokens_per_row_and_in_total(tmp_path):
    Image.new("RGB", (1024, 1024), "red").save(tmp_path / "big.png")
    make_image(tmp_path / "small.png", 1)
    rows = [{"image": "big.png"}, {"image": ["small.png", "small.png"]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_capflow(f"input={tmp_path / 'd.jsonl'}", "dry_run=true", "prompt=concise",
                         "image.max_side=1024", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    big = estimate_image_tokens(1024, 1024, None)
    small = estimate_image_tokens(32, 24, None)
    assert big == 765 and small == 255
    assert f"row 0: 1 image, ~{big} image tokens" in result.stdout
    assert f"row 1: 2 images, ~{2 * small} image tokens" in result.stdout
    assert f"~{big + 2 * small} image tokens in all" in result.stdout


def test_low_detail_costs_85_tokens():
    assert estimate_image_tokens(4000, 3000, "low") == 85
    assert estimate_image_tokens(4000, 3000, "high") == 85 + 170 * 4  # 1024x768: 4 tiles


def test_unknown_format_setting_is_a_config_error():
    with pytest.raises(ConfigError, match="image.format must be one of"):
        ImagePreparer(format="bmp")


@pytest.mark.parametrize("resample", ["auto", "bilinear", "hamming", "bicubic", "lanczos"])
def test_resample_filters(tmp_path, resample):
    _photo(tmp_path / "p.jpg", size=(800, 600))
    prepared = ImagePreparer(max_side=300, resample=resample).prepare("p.jpg", tmp_path)
    assert _decoded(prepared).size == (300, 225)
    with pytest.raises(ConfigError, match="image.resample must be one of"):
        ImagePreparer(resample="nearest")


def test_the_default_budget_keeps_a_12mp_photo_near_a_megapixel(tmp_path):
    raw = _photo(tmp_path / "p.jpg")
    prepared = ImagePreparer().prepare("p.jpg", tmp_path)
    assert (prepared.width, prepared.height) == (1264, 948)
    assert prepared.size * 10 <= len(raw)


def test_max_file_bytes_setting():
    from omegaconf import OmegaConf

    conf = OmegaConf.load(Path(__file__).parent.parent / "conf" / "config.yaml")
    assert conf.image.max_file_bytes == ImagePreparer().max_file_bytes == 64_000_000
    assert ImagePreparer(max_file_bytes=None).max_file_bytes is None
    with pytest.raises(ConfigError, match="image.max_file_bytes must be >= 0 or null"):
        ImagePreparer(max_file_bytes=-1)


def test_a_file_that_grows_past_max_file_bytes_while_read_is_refused(tmp_path, monkeypatch):
    # fstat said it fits; the read finds more: the cap holds for what is read too.
    make_image(tmp_path / "a.png", 1)
    size = (tmp_path / "a.png").stat().st_size
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: real_read(fd, n) + b"x" * 10)
    with pytest.raises(RowError, match=f"grew past image.max_file_bytes={size}") as caught:
        ImagePreparer(max_file_bytes=size).prepare("a.png", tmp_path)
    assert caught.value.kind == "ImageTooLarge"


def test_images_embedded_as_hugging_face_datasets_writes_them(tmp_path):
    """``{"bytes": ..., "path": ...}``: the bytes (a data URI or base64) when set, else the
    path; neither is a clear row error."""
    png = io.BytesIO()
    Image.new("RGB", (12, 7), (1, 2, 3)).save(png, "PNG")
    data = png.getvalue()
    (tmp_path / "on_disk.png").write_bytes(data)
    prep = ImagePreparer(prepare=False, cache=False)
    encoded = base64.b64encode(data).decode()
    for ref in ({"bytes": f"data:image/png;base64,{encoded}", "path": "elsewhere.png"},
                {"bytes": encoded, "path": None}, {"bytes": None, "path": "on_disk.png"}):
        image = prep.prepare(ref, tmp_path)
        assert (image.width, image.height) == (12, 7), ref
    with pytest.raises(RowError, match="must be a path or URL"):
        prep.prepare({"bytes": None, "path": None}, tmp_path)
