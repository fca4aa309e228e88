"""The console script's quick exit: exit codes, exit handlers and other threads survive it."""

from __future__ import annotations

import subprocess
import sys


def _console(argv: list[str], before: str = "") -> subprocess.CompletedProcess[str]:
    code = "\n".join([
        "import atexit, sys, threading, time",
        before,
        f"sys.argv = ['capflow', *{argv!r}]",
        "from capflow.cli import console",
        "console()",
        "print('not reached')",
    ])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


def test_exit_codes_and_output_come_through():
    done = _console(["--version"])
    assert done.returncode == 0 and done.stdout.startswith("capflow ")
    assert "not reached" not in done.stdout
    bad = _console(["key_name_of_api_key=sk-abc123"])
    assert bad.returncode == 2 and "must be the NAME" in bad.stderr


def test_exit_handlers_run_and_working_threads_finish():
    before = """
atexit.register(lambda: print("handler ran", flush=True))
threading.Thread(target=lambda: (time.sleep(0.5), print("thread done", flush=True))).start()
"""
    done = _console(["--version"], before)
    assert done.returncode == 0
    assert "handler ran" in done.stdout and "thread done" in done.stdout
