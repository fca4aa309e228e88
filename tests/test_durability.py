"""A run killed with SIGKILL keeps every finished row; the same command then finishes the job
(acceptance 6)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
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
    with FakeOpenAIServer(latency=0.1) as server:
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


# Runs the command under a file size limit: any write past it fails with EFBIG, as on a full
# disk, rather than the process being killed by SIGXFSZ.
_SIZE_LIMITED = """\
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.argv[2], sys.argv[2:])
"""


def test_a_full_disk_at_the_end_is_one_line_and_the_rerun_writes_the_output(tmp_path):
    data, rows = make_dataset(tmp_path, 400)
    out = tmp_path / "out.jsonl"
    # Above what a run that only writes its output needs besides it (SQLite's 32 KiB shared
    # memory files, Hydra's logs), below the output's size.
    limit = 64 * 1024
    with FakeOpenAIServer() as server:
        args = [CAPFLOW, f"input={data}", f"output={out}", f"api_url={server.base_url}",
                "model_name=m", "max_workers=16"]
        first = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        complete = out.read_text()
        assert len(complete) > limit + 16 * 1024
        earlier = "".join(complete.splitlines(keepends=True)[:5])
        out.write_text(earlier)  # an earlier output, which a failed write must leave alone
        sent = server.stats()["requests_total"]

        full = subprocess.run([sys.executable, "-c", _SIZE_LIMITED, str(limit), *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        # One line, whether the engine reports it as an error (2) or as a stop (1).
        assert full.returncode in (1, 2), full.stderr
        lines = full.stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in full.stdout, full.stderr
        assert lines[0].endswith(
            f": cannot write {out}: File too large; the finished rows are kept in the journal"
            f" {out}.journal.sqlite, free some space and run the same command again"
        )
        assert out.read_text() == earlier
        assert not list(tmp_path.glob(".out.jsonl.*"))  # no half-written temp file left

        again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert f"{len(rows)} skipped" in again.stdout
        assert out.read_text() == complete
        assert server.stats()["requests_total"] == sent  # the rows came from the journal
