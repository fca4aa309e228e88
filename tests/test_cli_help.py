"""``capflow --help`` says what every group option and key does, from the YAML files, in 100
columns and without Hydra; ``--cfg job`` shows the config resolved."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest
from conftest import run_capflow

from capflow.help import render
from capflow.plugins import ConfigRegistry, load_plugins

ROOT = Path(__file__).resolve().parents[1]
CONF = resources.files("capflow.conf")
_KEY = re.compile(r"^( *)(\w+):(.*)$")


def flat(text: str) -> str:
    """Text with runs of whitespace as one space: wrapped lines read as one."""
    return " ".join(text.split())


def first_comment(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.lstrip("# ").strip() if line.startswith("#") else ""
    return ""


def config_keys() -> list[tuple[str, str, str]]:
    """(dotted key, value, comment) of every key of config.yaml but defaults and hydra."""
    keys, block = [], ""
    for line in (CONF / "config.yaml").read_text().splitlines():
        match = _KEY.match(line)
        if not match:
            continue
        indent, key = match[1], match[2]
        value, _, comment = match[3].partition(" #")  # config.yaml's values hold no " #"
        value, comment = value.strip(), comment.strip()
        if not indent:
            block = key
        if block in ("defaults", "hydra") or len(indent) > 2 or key == "_target_":
            continue
        keys.append((f"{block}.{key}" if indent else key, value, comment))
    return keys


@pytest.fixture(scope="module")
def help_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    result = run_capflow("--help", cwd=tmp_path_factory.mktemp("help"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def test_every_group_option_is_listed_with_its_description(help_text):
    groups = sorted(d.name for d in CONF.iterdir() if d.is_dir() and not d.name.startswith("_"))
    assert groups
    for group in groups:
        options = sorted(f.name[:-5] for f in (CONF / group).iterdir() if f.name.endswith(".yaml"))
        assert f"{group}: {', '.join(options)}" in help_text.splitlines()
        for option in options:
            described = [line for line in help_text.splitlines()
                         if line.startswith(f"    {option}")]
            assert described, (group, option)
            description = first_comment((CONF / group / f"{option}.yaml").read_text())
            assert flat(description) in flat(help_text), (group, option)


def test_every_key_is_listed_with_its_default_and_comment(help_text):
    keys = config_keys()
    assert {"input", "max_workers", "image.max_side", "retry.max_attempts", "cache.enabled",
            "stop.outage_s"} <= {k for k, _, _ in keys}
    for key, value, comment in keys:
        shown = f"{key}:" if not value else f"{key}={value}"
        assert shown in help_text, key
        assert flat(comment) in flat(help_text), key


def test_help_is_readable(help_text):
    assert "_target_" not in help_text
    root = str(ROOT)  # a checkout's path is shown whole, however long
    assert all(len(line) <= max(100, len(root) + 10) for line in help_text.splitlines())
    assert "README.md" in help_text and "docs/plugins.md" in help_text and root in help_text
    for command in ("capflow plugins", "capflow models", "capflow show", "--cfg job", "-m "):
        assert command in help_text, command
    assert "key_name_of_api_key" in help_text


def test_help_needs_no_hydra_and_no_server(tmp_path):
    code = ("import sys; sys.argv = ['capflow', '--help', 'api_url=http://127.0.0.1:9/v1']\n"
            "from capflow.cli import main\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "print('hydra imported' if 'hydra' in sys.modules else 'no hydra', file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "no hydra"
    assert "== Config groups" in result.stdout


@dataclass
class Tanka:
    """Answers in a tanka of five lines."""

    name: str = "tanka"
    system: str = "Answer in a tanka."
    user: str = "Describe this image as a tanka."


def test_plugins_options_are_listed_with_their_descriptions(tmp_path):
    # The two ways a plugin adds options: a YAML tree on the search path, and a node.
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "local.yaml").write_text(
        "# serving=local: answers from a model on this machine.\n_target_: x.Local\n")
    _, registry = load_plugins()
    config = ConfigRegistry(registry, "localplugin")
    config.add_search_path(f"file://{tmp_path}")
    config.add_node("prompt", "tanka", Tanka)
    text = render(registry)
    assert "serving: batch_file, local, openai, openai_batch" in text.splitlines()
    assert ("prompt: alt_text, concise, detailed, ocr, seed, structured, tags, tanka"
            in text.splitlines())
    lines = text.splitlines()
    assert any(re.match(r"^    local +answers from a model on this machine\. \(from the plugin"
                        r" localplugin\)$", line) for line in lines), text
    assert any(re.match(r"^    tanka +Answers in a tanka of five lines\.", line)
               for line in lines), text


def test_an_installed_plugins_option_is_in_the_console_scripts_help(tmp_path):
    # capflow-echo pip-installed into a folder on PYTHONPATH (not into this environment).
    source = shutil.copytree(ROOT / "plugins" / "capflow-echo", tmp_path / "src",
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                    "--no-build-isolation", "--disable-pip-version-check", "--quiet",
                    "--target", str(target), str(source)], check=True, capture_output=True,
                   timeout=120)
    result = run_capflow("--help", cwd=tmp_path, env={"PYTHONPATH": str(target),
                                                      "CAPFLOW_DISABLE_PLUGINS": ""})
    assert result.returncode == 0, result.stderr
    assert "serving: batch_file, echo, openai, openai_batch" in result.stdout.splitlines()
    assert re.search(r"^    echo +answers locally, without a model \(from the capflow-echo"
                     r" plugin\)\.$", result.stdout, re.MULTILINE), result.stdout


def test_cfg_job_shows_the_samples_path(tmp_path):
    sample = resources.files("capflow.data") / "sample" / "sample_data.json"
    for resolve in ([], ["--resolve"]):
        result = run_capflow("--cfg", "job", *resolve, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"input: {sample}\n" in result.stdout
        assert "${" not in result.stdout  # every interpolation of capflow's config resolves


def test_cfg_job_keeps_environment_lookups_as_written(tmp_path):
    result = run_capflow("--cfg", "job", "+serving.extra_body.token=${oc.env:SOME_TOKEN}",
                         "model_name=${serving.extra_body.token}", cwd=tmp_path,
                         env={"SOME_TOKEN": "tok-abc123"})
    assert result.returncode == 0, result.stderr
    assert "tok-abc123" not in result.stdout
    assert "token: ${oc.env:SOME_TOKEN}" in result.stdout
