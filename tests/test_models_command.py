"""``capflow models``: a server's models, through the same config and transports as a run."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import CAPFLOW

from capflow.testing.server import FakeOpenAIServer

# Until cli.py dispatches `capflow models` to capflow.models_command.main, the module is run
# directly; test_console_script_dispatches_models runs the real console script once it does.
MODELS = [CAPFLOW, "models"]


def models(*args: str, cwd: Path, env: dict[str, str] | None = None,
           command: list[str] = MODELS) -> subprocess.CompletedProcess[str]:
    """Run the command with no API key in the environment unless ``env`` adds one, and no
    proxy for the loopback servers."""
    full_env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    full_env["NO_PROXY"] = full_env["no_proxy"] = "127.0.0.1,localhost"
    full_env.update(env or {})
    return subprocess.run([*command, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=60)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("capflow models: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def two_models() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(models=["a", "b"]) as server:
        yield server


@pytest.mark.parametrize("transport", ["auto", "http", "aiohttp", "sdk"])
def test_lists_each_model_on_its_own_line(two_models, tmp_path, transport):
    result = models(f"api_url={two_models.base_url}", f"serving.transport={transport}",
                    "timeout=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "a\nb\n"
    assert list(tmp_path.iterdir()) == []  # nothing written where it runs


def test_a_missing_key_is_named(tmp_path):
    with FakeOpenAIServer(models=["m"], api_key="sk-test-secret-1234") as server:
        missing = models(f"api_url={server.base_url}", cwd=tmp_path)
        assert missing.returncode == 1
        line = one_line_error(missing)
        assert "401" in line and "CAPFLOW_API_KEY is not set" in line

        other = models(f"api_url={server.base_url}", "key_name_of_api_key=MY_KEY",
                       env={"MY_KEY": "wrong-key-5678"}, cwd=tmp_path)
        assert other.returncode == 1
        line = one_line_error(other)
        assert "MY_KEY" in line and "wrong-key-5678" not in line

        right = models(f"api_url={server.base_url}", "key_name_of_api_key=MY_KEY",
                       env={"MY_KEY": "sk-test-secret-1234"}, cwd=tmp_path)
        assert right.returncode == 0, right.stderr
        assert right.stdout == "m\n"


def test_no_api_url_is_a_config_error(tmp_path):
    result = models(cwd=tmp_path)
    assert result.returncode == 2
    assert "set api_url=" in one_line_error(result)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["api_ur=http://127.0.0.1:9/v1"], "did you mean api_url?"),
        (["serving.transprt=http"], "did you mean serving.transport?"),
        (["serving=nope"], "(options: batch_file, openai, openai_batch"),
        (["api_url"], "overrides are key=value"),
        (["api_url=ftp://127.0.0.1/v1"], "must be an http(s) URL"),
        (["api_url=http://127.0.0.1:9/v1", "serving.ca_file=/no/such/ca.pem"], "ca_file"),
        (["--verbose"], "unknown option --verbose"),
    ],
)
def test_config_mistakes_are_one_line_and_exit_2(tmp_path, args, says):
    result = models(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert says in one_line_error(result)


class _V1Only(BaseHTTPRequestHandler):
    """A server whose API lives under /v1 only: anything else is a 404."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
        if self.path == "/v1/models":
            status, body = 200, {"object": "list", "data": [{"id": "only-v1", "object": "model"}]}
        else:
            status, body = 404, {"error": {"message": f"no route {self.path}"}}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def v1_only() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _V1Only)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_404_without_v1_suggests_the_v1_url(v1_only, tmp_path):
    result = models(f"api_url={v1_only}", cwd=tmp_path)
    assert result.returncode == 1
    line = one_line_error(result)
    assert "404" in line and f"did you mean api_url={v1_only}/v1" in line
    fixed = models(f"api_url={v1_only}/v1", cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout == "only-v1\n"


def test_an_unreachable_server_is_one_line(tmp_path):
    result = models("api_url=http://127.0.0.1:9/v1", "timeout=5", cwd=tmp_path)
    assert result.returncode == 1
    assert "cannot list the models at http://127.0.0.1:9/v1" in one_line_error(result)
