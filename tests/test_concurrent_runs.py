"""One run per output: a second run on the same output stops at once, before it sends anything,
naming the run that holds the output; a run killed with SIGKILL leaves nothing that blocks the
next one."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CAPFLOW, expected_caption, make_dataset, read_rows, run_capflow

from capflow.errors import ConfigError
from capflow.storage import lock as lock_module
from capflow.storage.journal import RunJournal
from capflow.storage.lock import RunLock, lock_path_for
from capflow.testing.server import FakeOpenAIServer

pytestmark = pytest.mark.skipif(lock_module.fcntl is None, reason="needs fcntl.flock")

_HOLDER = """\
import sys, time
from pathlib import Path
from capflow.storage.lock import RunLock
held = RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def _holder_pid(lock: Path) -> int | None:
    try:
        return json.loads(lock.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def _start_holder(tmp_path: Path, journal: Path) -> subprocess.Popen[str]:
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(journal)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


# --- the lock itself --------------------------------------------------------------------------


def test_a_second_lock_in_the_same_process_is_refused_then_free_after_release(tmp_path):
    journal = tmp_path / "out.jsonl.journal.sqlite"
    first = RunLock(journal).acquire()
    with pytest.raises(ConfigError) as refused:
        RunLock(journal).acquire()
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'out.jsonl'} is being written by another run in this"
                              f" same process (pid {os.getpid()} on ")
    assert message.endswith(": wait for it to end or stop it") and "\n" not in message
    first.release()
    assert not lock_path_for(journal).exists()  # no litter beside a finished output
    with RunLock(journal):
        assert _holder_pid(lock_path_for(journal)) == os.getpid()


def test_the_refusal_names_the_holding_process_and_kill_9_frees_the_lock(tmp_path):
    journal = tmp_path / "out.jsonl.journal.sqlite"
    holder = _start_holder(tmp_path, journal)
    try:
        with pytest.raises(ConfigError) as refused:
            RunLock(journal).acquire()
        message = str(refused.value)
        assert "is being written by another capflow run" in message
        assert f"pid {holder.pid} on " in message
        assert "started " in message and "command: holder.py " in message
    finally:
        holder.kill()  # SIGKILL: the holder cannot clean anything up
        holder.wait()
    assert lock_path_for(journal).exists()  # the killed holder's file is still there...
    began = time.monotonic()
    with RunLock(journal):  # ...but the kernel dropped its lock: taken at once
        assert time.monotonic() - began < 1.0
        assert _holder_pid(lock_path_for(journal)) == os.getpid()


def test_a_lock_file_removed_between_open_and_lock_is_not_trusted(tmp_path):
    """The unlink race: a run opens the lock file, the holder ends (removing the file), and the
    run then locks the removed inode. It must notice and lock the file at the path instead,
    or a third run would lock a new file there and two runs would each think they are alone."""
    journal = tmp_path / "out.jsonl.journal.sqlite"
    holder = RunLock(journal).acquire()
    opened: list[int] = []

    class LateRun(RunLock):
        def _open(self) -> int:
            fd = super()._open()
            opened.append(os.fstat(fd).st_ino)
            if len(opened) == 1:
                holder.release()  # the holder ends just after this run opened its file
            return fd

    late = LateRun(journal).acquire()
    assert len(opened) == 2  # it saw the first inode go and started again
    assert os.stat(lock_path_for(journal)).st_ino == opened[1]
    with pytest.raises(ConfigError, match="is being written by another run in this same"):
        RunLock(journal).acquire()  # a third run finds the live lock
    late.release()


def test_a_lock_its_owner_dropped_without_release_does_not_outlive_it(tmp_path):
    journal = tmp_path / "out.jsonl.journal.sqlite"
    RunLock(journal).acquire()  # an owner that failed before it could release
    gc.collect()
    with RunLock(journal):
        pass


def test_without_fcntl_runs_go_unlocked_and_say_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(lock_module, "fcntl", None)  # as on Windows
    monkeypatch.setattr(lock_module, "_warned_no_flock", False)
    caplog.set_level(logging.WARNING, logger=lock_module.__name__)
    journal = tmp_path / "out.jsonl.journal.sqlite"
    with RunLock(journal), RunLock(journal):
        pass
    warnings = [r for r in caplog.records if "file locks are not available" in r.message]
    assert len(warnings) == 1
    assert not lock_path_for(journal).exists()


def test_a_journal_held_by_a_run_is_neither_opened_nor_cleared_by_another(tmp_path):
    path = tmp_path / "out.jsonl.journal.sqlite"
    first = RunJournal(path, "fingerprint-a")
    first.add([(0, True, '{"id": "0", "caption": "c"}')])
    # Another input or settings: were it let in, it would clear the first run's rows.
    with pytest.raises(ConfigError, match="is being written by another run"):
        RunJournal(path, "fingerprint-b")
    assert list(first.lines()) == ['{"id": "0", "caption": "c"}']
    first.close()
    assert not lock_path_for(path).exists()
    second = RunJournal(path, "fingerprint-b")  # free once the first has closed
    assert list(second.lines()) == []
    second.close()


# --- real runs of the console script ------------------------------------------------------------


def test_a_second_run_on_the_same_output_stops_at_once_and_sends_nothing(tmp_path):
    data, rows = make_dataset(tmp_path, 16)
    out = tmp_path / "out.jsonl"
    lock = lock_path_for(tmp_path / "out.jsonl.journal.sqlite")
    args = [f"input={data}", f"output={out}", "model_name=m", "max_workers=2"]
    with FakeOpenAIServer(latency=0.4) as server:  # keeps the first busy for about 3 s
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        first = subprocess.Popen([CAPFLOW, *args, f"api_url={server.base_url}"], cwd=tmp_path,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        try:
            _wait_for(lambda: server.stats()["requests_total"] > 0)
            assert _holder_pid(lock) == first.pid
            sent_before = server.stats()["requests_total"]
            began = time.monotonic()
            second = run_capflow(*args, f"api_url={server.base_url}", cwd=tmp_path, timeout=60)
            took = time.monotonic() - began
            # It did not wait for the first: that one is still at work.
            assert first.poll() is None, "the first run ended before the second was refused"
            stdout, stderr = first.communicate(timeout=60)
        finally:
            if first.poll() is None:
                first.kill()
        sent_in_all = server.stats()["requests_total"]

    assert second.returncode == 2, second.stderr
    lines = second.stderr.splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith(f"capflow: error: {out} is being written by another capflow run"
                               f" (pid {first.pid} on ")
    assert "command: capflow " in lines[0] and lines[0].endswith("wait for it to end or stop it")
    assert took < 10
    # Every request the server saw was the first run's: one per row, none from the second.
    assert sent_before <= len(rows) and sent_in_all == len(rows)

    assert first.returncode == 0, stderr
    final = read_rows(out)
    assert [r["id"] for r in final] == [r["id"] for r in rows]
    for original, row in zip(rows, final, strict=True):
        assert row["caption"] == expected_caption(tmp_path / original["image"][0])
    assert not lock.exists()


def test_a_run_killed_with_sigkill_does_not_block_the_next_run(tmp_path):
    data, rows = make_dataset(tmp_path, 24)
    out = tmp_path / "out.jsonl"
    lock = lock_path_for(tmp_path / "out.jsonl.journal.sqlite")
    with FakeOpenAIServer(latency=0.3) as server:
        args = [f"input={data}", f"output={out}", f"api_url={server.base_url}", "model_name=m",
                "max_workers=2"]
        proc = subprocess.Popen([CAPFLOW, *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            _wait_for(lambda: _holder_pid(lock) == proc.pid
                      and server.stats()["requests_total"] > 0)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert lock.exists() and _holder_pid(lock) == proc.pid  # a stale file, but no lock
        server.latency = 0
        result = run_capflow(*args, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    final = read_rows(out)
    assert [r["id"] for r in final] == [r["id"] for r in rows]
    assert all(r["caption"] == expected_caption(tmp_path / o["image"][0])
               for o, r in zip(rows, final, strict=True))
    assert not lock.exists()
