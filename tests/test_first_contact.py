"""First contact: each mistake a newcomer makes is a short error before anything is spent, and
leaves the working folder as it was."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import make_dataset, run_capflow

from capflow.testing.server import FakeOpenAIServer


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _bad_json(root: Path) -> list[str]:
    data, _ = make_dataset(root, 50)
    text = data.read_text()
    cut = text.rindex("},")  # the comma between the last two rows goes missing
    data.write_text(text[:cut + 1] + text[cut + 2:])
    return [f"input={data}", f"output={root / 'out.jsonl'}"]


def _bad_utf8(root: Path) -> list[str]:
    data, _ = make_dataset(root, 20, name="data.jsonl")
    data.write_bytes(data.read_bytes().replace(b"cam/a", b"cam/\xff", 1))
    return [f"input={data}", f"output={root / 'out.jsonl'}"]


def _output_folder(root: Path) -> list[str]:
    data, _ = make_dataset(root, 5)
    (root / "results").mkdir()
    return [f"input={data}", f"output={root / 'results'}"]


def _csv_without_image_column(root: Path) -> list[str]:
    make_dataset(root, 3)
    (root / "data.csv").write_text("id,picture_file\n1,images/00000.png\n2,images/00001.png\n")
    return [f"input={root / 'data.csv'}", f"output={root / 'out.jsonl'}"]


def _missing_input(root: Path) -> list[str]:
    return [f"input={root / 'nowhere.json'}", f"output={root / 'out.jsonl'}"]


def _unwritable_output(root: Path) -> list[str]:
    data, _ = make_dataset(root, 5)
    (root / "locked").mkdir()
    (root / "locked").chmod(0o500)
    return [f"input={data}", f"output={root / 'locked' / 'out.jsonl'}"]


def _output_under_a_file(root: Path) -> list[str]:
    data, _ = make_dataset(root, 5)
    (root / "notes.txt").write_text("a file, not a folder")
    return [f"input={data}", f"output={root / 'notes.txt' / 'out.jsonl'}"]


CASES = {
    "JSON syntax error": (_bad_json, "expected ',' or ']' after row 49"),
    "invalid UTF-8": (_bad_utf8, "not valid UTF-8"),
    "output is a folder": (_output_folder, "output is a folder"),
    "CSV without an image column": (_csv_without_image_column, "storage.image_column"),
    "missing input": (_missing_input, "nowhere.json"),
    "unwritable output": (_unwritable_output, "not writable"),
    "output under a file": (_output_under_a_file, "is a file, not a folder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_is_a_short_error_with_nothing_sent_and_nothing_left(tmp_path, case):
    make, says = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    args = make(work)
    if case == "unwritable output" and os.geteuid() == 0:
        pytest.skip("root writes anywhere: test_input_checks covers this case as another user")
    before = _files(work)
    with FakeOpenAIServer() as server:
        result = run_capflow(*args, f"api_url={server.base_url}", "model_name=m", cwd=work)
        sent = server.stats()["requests_total"]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert 1 <= len(lines) <= 3 and "Traceback" not in result.stderr
    assert says in result.stderr
    assert sent == 0
    assert _files(work) == before  # no output, journal, lock, cache or run folder


class _OnlyV1(BaseHTTPRequestHandler):
    """A server whose API lives under /v1 only: anything else is a 404."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook
        if self.path == "/v1/models":
            body, status = {"object": "list", "data": [{"id": "m"}]}, 200
        else:
            body, status = {"error": {"message": f"no route {self.path}"}}, 404
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


def test_an_api_url_without_v1_gets_the_v1_url_suggested(tmp_path):
    data, _ = make_dataset(tmp_path, 5)
    before = _files(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OnlyV1)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{server.server_port}"
    try:
        result = run_capflow(f"input={data}", f"output={tmp_path / 'out.jsonl'}",
                             f"api_url={root}", cwd=tmp_path)
    finally:
        server.shutdown()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"did you mean {root}/v1" in lines[0]
    assert _files(tmp_path) == before
