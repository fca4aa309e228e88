"""A run killed with SIGKILL keeps every finished row; the same command then finishes the job
(acceptance 6)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time

from conftest import CAPFLOW, expected_caption, make_dataset, read_rows

from capflow.testing.server import FakeOpenAIServer


def _journal_rows(path) -> list[tuple[int, str]]:
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT idx, line FROM rows ORDER BY idx").fetchall()
    except sqlite3.OperationalError:  # the table is not created yet
        return []
    finally:
        db.close()


def test_kill_9_keeps_finished_rows_and_rerun_completes(tmp_path):
    data, rows = make_dataset(tmp_path, 120)
    out = tmp_path / "out.jsonl"
    journal = tmp_path / "out.jsonl.journal.sqlite"
    workers = 4
    with FakeOpenAIServer(latency=0.2) as server:
        args = [CAPFLOW, f"input={data}", f"output={out}", f"api_url={server.base_url}",
                "model_name=m", f"max_workers={workers}"]
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(_journal_rows(journal)) < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        answered_before_kill = server.stats()["responses_ok"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kept = _journal_rows(journal)
        assert 30 <= len(kept) < 120
        # Every answer the server had sent, but for those still in flight, was on disk.
        assert len(kept) >= answered_before_kill - workers
        for idx, line in kept:
            row = json.loads(line)
            assert row["caption"] == expected_caption(tmp_path / rows[idx]["image"][0])

        result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert f"{len(kept)} skipped" in result.stdout
        final = read_rows(out)
        assert [r["id"] for r in final] == [r["id"] for r in rows]
        for original, row in zip(rows, final, strict=True):
            assert row["caption"] == expected_caption(tmp_path / original["image"][0])
        ok = sum(1 for r in server.requests if r.status == 200)
        assert ok <= len(rows) + workers
