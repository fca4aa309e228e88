"""Shared fixtures: a real loopback OpenAI-compatible server, datasets of generated images, and
a runner for the real ``capflow`` console script."""

from __future__ import annotations

import gc
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from capflow.testing.pytest_plugin import capflow_executable, run_cli
from capflow.testing.server import FakeOpenAIServer, describe_image

CAPFLOW = capflow_executable()


def colour_of(i: int) -> tuple[int, int, int]:
    """A colour unique to row ``i`` (for up to 256*256 rows)."""
    return (i % 256, (i // 256) % 256, 200)


def make_image(path: Path, i: int, size: tuple[int, int] = (32, 24)) -> bytes:
    """Write a small PNG whose mean colour identifies row ``i``; returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour_of(i)).save(path, "PNG")
    return path.read_bytes()


def make_dataset(root: Path, n: int, name: str = "data.json") -> tuple[Path, list[dict]]:
    """A seed-format dataset of ``n`` rows, each with its own image under ``root/images``.

    Rows carry fields that a careless reader would mangle: a zero-padded string id, a
    date-like string, a float in exponent form and a nested unknown key.
    """
    rows = []
    for i in range(n):
        make_image(root / "images" / f"{i:05d}.png", i)
        rows.append(
            {
                "id": f"{i:04d}",
                "image": [f"./images/{i:05d}.png"],
                "conversation": [
                    {"from": "human", "value": "Generate detailed captions based on image content."}
                ],
                "taken": "2024-01-02",
                "score": 1e5,
                "meta": {"source": "cam/a", "tags": ["x", "y"]},
            }
        )
    write_rows(root / name, rows)
    return root / name, rows


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write rows as a JSON array (``.json``) or JSON Lines (``.jsonl``)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows, indent=2))


def expected_caption(image_path: Path) -> str:
    """What the test server answers for a request carrying this one image."""
    return describe_image(image_path.read_bytes())


def read_rows(path: Path) -> list[dict]:
    """Rows of a .json or .jsonl output file."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


@pytest.fixture
def server(openai_server: FakeOpenAIServer) -> FakeOpenAIServer:
    """The kit's ``openai_server`` (capflow/testing/pytest_plugin.py), by its shorter name."""
    return openai_server


def run_capflow(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real console script; the environment has no API key unless ``env`` adds one."""
    return run_cli(*args, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(autouse=True)
def _no_pauses_for_earlier_tests_garbage() -> None:
    """What earlier tests left on the heap is set aside from the garbage collector: a full
    collection of the whole suite's heap stalls the in-process test servers and event loops for
    tens of milliseconds, which tests of latency-driven sending would read as a slow server."""
    gc.freeze()


@pytest.fixture(autouse=True)
def _no_plugin_leaks() -> Iterator[None]:
    """Every test starts and ends with the process's plugins freshly loaded."""
    import capflow.plugins

    capflow.plugins._loaded = None
    yield
    capflow.plugins._loaded = None


