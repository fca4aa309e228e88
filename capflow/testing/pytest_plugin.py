"""capflow's pytest kit, for testing capflow and its plugins: loaded by pytest wherever capflow
is installed (the ``pytest11`` entry point), nothing to import.

Fixtures:

- ``openai_server``: a real OpenAI-compatible HTTP server on loopback
  (``capflow.testing.server.FakeOpenAIServer``). ``.base_url`` goes to ``api_url``; its answers
  are deterministic (``describe_image`` of each image sent); ``.requests`` records what it was
  asked; ``.latency``, ``.set_faults(rate_500=0.1, ...)`` and ``.failure`` change how it answers.
- ``capflow_cli``: runs the real ``capflow`` command, ``capflow_cli("input=...", "api_url=...",
  cwd=path)``, and returns its ``returncode``, ``stdout`` and ``stderr``. The working folder is
  the test's ``tmp_path`` unless ``cwd`` says otherwise; API keys are taken out of the
  environment unless ``env`` adds one.
- ``capflow_config``: composes capflow's config in-process, as the command line would, with the
  installed plugins' options: ``cfg = capflow_config("serving=echo", "max_workers=3")``.

Example, a plugin's test::

    def test_my_serving_answers(capflow_cli, tmp_path):
        result = capflow_cli("serving=mine", "dry_run=false")
        assert result.returncode == 0, result.stderr
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from capflow.testing.server import FakeOpenAIServer

CliRunner = Callable[..., "subprocess.CompletedProcess[str]"]


def capflow_executable() -> str:
    """The ``capflow`` console script beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).with_name("capflow")
    return str(beside) if beside.exists() else shutil.which("capflow") or "capflow"


def capflow_command() -> list[str]:
    """How to run ``capflow`` with this interpreter's plugins: the console script beside it, or
    ``python -m capflow`` where there is none (a venv that sees capflow from another
    environment, whose script would not see this one's plugins)."""
    beside = Path(sys.executable).with_name("capflow")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "capflow"]


@pytest.fixture
def openai_server() -> Iterator[FakeOpenAIServer]:
    """A loopback OpenAI-compatible server for this test (stopped after it)."""
    with FakeOpenAIServer() as server:
        yield server


def run_cli(*args: str, cwd: str | os.PathLike[str], env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the ``capflow`` command in ``cwd``; the environment has no API key unless ``env``
    adds one."""
    full_env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    full_env.update(env or {})
    return subprocess.run([*capflow_command(), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def capflow_cli(tmp_path: Path) -> CliRunner:
    """``run(*args, cwd=tmp_path, env=None, timeout=120)``: the ``capflow`` command's result."""

    def run(*args: str, cwd: str | os.PathLike[str] | None = None,
            env: dict[str, str] | None = None, timeout: float = 120,
            ) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, cwd=cwd or tmp_path, env=env, timeout=timeout)

    return run


@pytest.fixture
def capflow_config() -> Iterator[Callable[..., Any]]:
    """``compose(*overrides)``: capflow's config composed as the command line would, plugins'
    options and capflow's resolvers included (a ``DictConfig``)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from capflow import _hydra_bridge
    from capflow.plugins import get_plugins

    _hydra_bridge.install(get_plugins()[1])
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="capflow.conf", version_base=None):
        yield lambda *overrides: compose(config_name="config", overrides=list(overrides))
    GlobalHydra.instance().clear()
