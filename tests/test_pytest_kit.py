"""The pytest kit for plugin authors (capflow/testing/pytest_plugin.py): a test that uses only its
fixtures passes wherever capflow is installed, with no conftest of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

A_PLUGIN_AUTHORS_TEST = '''
import json


def test_a_caption_through_the_kit(openai_server, capflow_cli, capflow_config, tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 24), (10, 200, 30)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.png"}) + "\\n")
    result = capflow_cli("input=d.jsonl", "output=o.jsonl", f"api_url={openai_server.base_url}",
                         "model_name=m")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "o.jsonl").read_text())["caption"] == "32x24 #0ac81e"
    assert len(openai_server.requests) == 1

    openai_server.set_faults(rate_500=1.0)
    failed = capflow_cli("input=d.jsonl", "output=p.jsonl", f"api_url={openai_server.base_url}",
                         "model_name=m", "retry.max_attempts=1", "cache.enabled=false")
    assert failed.returncode == 1

    cfg = capflow_config("max_workers=3")
    assert cfg.serving.max_workers == 3
'''


def test_the_kit_is_a_pytest_plugin_of_the_installed_package():
    found = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert found.get("capflow") == "capflow.testing.pytest_plugin"


def test_a_test_written_only_against_the_kit_passes(tmp_path):
    (tmp_path / "test_with_the_kit.py").write_text(A_PLUGIN_AUTHORS_TEST)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(tmp_path / "test_with_the_kit.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_the_kit_fixtures_here_too(openai_server, capflow_cli, tmp_path):
    Path(tmp_path / "d.json").write_text(json.dumps([{"image": "missing.png"}]))
    result = capflow_cli("input=d.json", "output=o.jsonl", f"api_url={openai_server.base_url}",
                         "model_name=m")
    assert result.returncode == 1 and openai_server.requests == []  # nothing to send
    assert "ImageNotFound" in result.stdout
