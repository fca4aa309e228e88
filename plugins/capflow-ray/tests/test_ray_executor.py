"""executor=ray through the real capflow command, on a local Ray it starts, against capflow's
loopback OpenAI server, with nothing but capflow's pytest kit (``openai_server``,
``capflow_cli``). Tests marked ``slow`` run the issue's full sizes (``pytest -m slow``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from capflow.testing.pytest_plugin import capflow_command
from capflow.testing.server import describe_image


def dataset(folder: Path, rows: int, images: int | None = None) -> Path:
    """``rows`` rows of JSON Lines, each with its own small PNG (or one of ``images``)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    images = images or rows
    for i in range(images):
        Image.new("RGB", (20 + i % 97, 10 + i // 97), (i % 256, 40, 90)).save(
            folder / "img" / f"{i}.png")
    with open(folder / "data.jsonl", "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"{i:05d}", "image": f"img/{i % images}.png",
                                "meta": {"n": i, "tags": ["a", "b"]}, "score": 1e5}) + "\n")
    return folder / "data.jsonl"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_args(server, *extra: str) -> list[str]:  # noqa: ANN001
    return ["input=data.jsonl", f"api_url={server.base_url}", "model_name=m", *extra]


@pytest.mark.parametrize("rows, limit", [(400, 16), pytest.param(2000, 64, marks=pytest.mark.slow)])
def test_same_rows_as_the_local_engine_with_a_global_in_flight_limit(openai_server, capflow_cli,
                                                                    tmp_path, rows, limit):
    """Caption, then filter (a map step: rows whose caption does not start with 2 dropped)."""
    dataset(tmp_path, rows)
    openai_server.latency = 0.02
    pipeline = ("pipeline=caption_filter", "pipeline.steps.keep.pattern='^2'")
    ray = capflow_cli(*run_args(openai_server, *pipeline, "executor=ray",
                                "executor.num_workers=2", f"max_workers={limit}",
                                "output=ray.jsonl",
                                "cache.path=ray-cache/responses.sqlite"), timeout=600)
    assert ray.returncode == 0, ray.stderr[-3000:]
    peak = openai_server.stats()["max_in_flight"]
    assert peak <= limit
    print(f"{rows} rows, max_workers={limit}: the server saw at most {peak} in flight")
    local = capflow_cli(*run_args(openai_server, *pipeline, "output=local.jsonl",
                                  f"max_workers={limit}",
                                  "cache.path=local-cache/responses.sqlite"))
    assert local.returncode == 0, local.stderr
    ray_rows, local_rows = read(tmp_path / "ray.jsonl"), read(tmp_path / "local.jsonl")
    assert ray_rows == local_rows and ray_rows  # every field, in input order
    for row in ray_rows:  # each caption is about its own image
        assert row["caption"] == describe_image((tmp_path / row["image"]).read_bytes())
    # The rows the filter dropped are listed as locally.
    dropped = read(tmp_path / "ray.jsonl.dropped.jsonl")
    assert dropped == read(tmp_path / "local.jsonl.dropped.jsonl")
    assert len(dropped) + len(ray_rows) == rows
    kept = len(ray_rows)
    assert f"{rows} of {rows}: {kept} kept, {rows - kept} dropped, 0 failed" in ray.stdout
    manifest = json.loads((tmp_path / "ray.jsonl.run.json").read_text())
    assert manifest["executor"] == "ray" and manifest["summary"]["done"] == kept


def test_a_failed_row_fails_alone_and_a_folder_output_takes_shards(openai_server,
                                                                    capflow_cli, tmp_path):
    dataset(tmp_path, 25)
    (tmp_path / "img" / "7.png").unlink()
    (tmp_path / "img" / "11.png").unlink()  # the same place in its batch of 4 as row 7
    result = capflow_cli(*run_args(openai_server, "executor=ray", "executor.num_workers=2",
                                   "executor.batch_rows=4", "executor.rows_per_shard=10",
                                   "output=shards/"), timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]  # a row failed, as locally
    assert "25 of 25: 23 done, 2 failed" in result.stdout
    assert "failed    row 7: ImageNotFound" in result.stdout  # named by their input index
    parts = sorted((tmp_path / "shards").glob("part-*.jsonl"))
    assert [p.name for p in parts] == ["part-00000.jsonl", "part-00001.jsonl",
                                       "part-00002.jsonl"]
    rows = [r for p in parts for r in read(p)]
    assert [r["id"] for r in rows] == [f"{i:05d}" for i in range(25)]
    assert rows[7]["_error"]["type"] == rows[11]["_error"]["type"] == "ImageNotFound"
    assert all(r["caption"] for i, r in enumerate(rows) if i not in (7, 11))
    assert (tmp_path / "shards" / "capflow.run.json").is_file()


def test_rpm_holds_for_the_whole_job(openai_server, capflow_cli, tmp_path):
    dataset(tmp_path, 60)
    result = capflow_cli(*run_args(openai_server, "executor=ray", "executor.num_workers=2",
                                   "executor.batch_rows=10", "rpm=600", "output=out.jsonl"),
                         timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    times = sorted(r.received_at for r in openai_server.requests)
    assert len(times) == 60
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    print(f"rpm=600, {len(times)} rows, 2 actors: at most {busiest} requests in a 1-s window")
    assert busiest <= 15, busiest


@pytest.mark.slow
def test_rpm_600_over_1000_rows(openai_server, capflow_cli, tmp_path):
    dataset(tmp_path, 1000, images=100)
    result = capflow_cli(*run_args(openai_server, "executor=ray", "executor.num_workers=2",
                                   "rpm=600", "output=out.jsonl",
                                   "prompt.user='Describe image {id}.'"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    times = sorted(r.received_at for r in openai_server.requests)
    assert len(times) == 1000
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    print(f"rpm=600, {len(times)} rows, 2 actors: at most {busiest} requests in a 1-s window")
    assert busiest <= 15, busiest


def test_killed_with_sigkill_the_rerun_completes_paying_little_twice(openai_server, tmp_path):
    """The driver and every Ray process are killed mid-run; the same command run again writes
    the whole output and pays again for at most 2 x max_workers requests."""
    rows = 600
    dataset(tmp_path, rows)
    openai_server.latency = 0.05
    args = [*capflow_command(), *run_args(openai_server, "executor=ray",
                                          "executor.num_workers=2", "executor.batch_rows=40",
                                          "max_workers=8", "output=out.jsonl")]
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    job = subprocess.Popen(args, cwd=tmp_path, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(openai_server.requests) < rows // 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.poll() is None, "the job ended before it could be killed"
    family = _descendants(job.pid)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and the Ray it started ...
    for pid in family:  # ... also those of its processes that left its session
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    job.wait()
    assert not (tmp_path / "out.jsonl").exists()
    first = len(openai_server.requests)
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    out = read(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [f"{i:05d}" for i in range(rows)]
    assert all(r["caption"] for r in out)
    asked = Counter(r.images[0] for r in openai_server.requests)
    paid_twice = sum(n - 1 for n in asked.values() if n > 1)
    print(f"killed after {first} requests; the rerun sent {len(openai_server.requests) - first},"
          f" {paid_twice} of them paid twice")
    assert paid_twice <= 2 * 8, (paid_twice, first)


def _descendants(root: int) -> list[int]:
    """The PIDs of ``root``'s children, their children, and so on."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
