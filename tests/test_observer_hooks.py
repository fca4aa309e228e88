"""Plugins observe a run: its start, every finished row, its end."""

from __future__ import annotations

from conftest import make_dataset

from capflow import hookimpl
from capflow.engine import EngineSettings
from capflow.operators import PromptedVQAGenerator
from capflow.plugins import get_plugin_manager
from capflow.serving import OpenAIServing
from capflow.storage import FileStorage


class Observer:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    @hookimpl
    def capflow_run_start(self, run):
        self.events.append(("start", run.rows, run.dry_run))

    @hookimpl
    def capflow_row_finished(self, result):
        self.events.append(("row", result.index, result.error["type"] if result.error else None))

    @hookimpl
    def capflow_run_end(self, summary):
        self.events.append(("end", summary.done, summary.failed))


def test_observer_sees_start_each_row_and_end(server, tmp_path):
    data, _ = make_dataset(tmp_path, 4)
    (tmp_path / "images" / "00001.png").unlink()
    observer = Observer()
    pm = get_plugin_manager()
    pm.register(observer, name="test-observer")
    try:
        serving = OpenAIServing(api_url=server.base_url, model_name="m")
        op = PromptedVQAGenerator(serving, output_answer_key="caption")
        op.run(FileStorage(str(data), cache_path=str(tmp_path / "c")).step(),
               settings=EngineSettings(report=False))
    finally:
        pm.unregister(name="test-observer")
    # check() reads the JSON array once for its syntax before anything is sent, which counts
    # its rows: the observer knows the total from the start.
    assert observer.events[0] == ("start", 4, False)
    assert observer.events[-1] == ("end", 3, 1)
    rows = sorted(e[1:] for e in observer.events if e[0] == "row")
    assert rows == [(0, None), (1, "ImageNotFound"), (2, None), (3, None)]


class BrokenObserver:
    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def capflow_row_finished(self, result):
        self.calls += 1
        raise RuntimeError("observer bug")


def test_a_failing_observer_never_stops_the_run(server, tmp_path, caplog):
    data, _ = make_dataset(tmp_path, 5)
    observer = BrokenObserver()
    pm = get_plugin_manager()
    pm.register(observer, name="broken-observer")
    try:
        serving = OpenAIServing(api_url=server.base_url, model_name="m")
        op = PromptedVQAGenerator(serving, output_answer_key="caption")
        summary = op.run(FileStorage(str(data), cache_path=str(tmp_path / "c")).step(),
                         settings=EngineSettings(report=False))
    finally:
        pm.unregister(name="broken-observer")
    assert summary.done == 5 and observer.calls == 1
    assert ("plugin 'broken-observer' failed in capflow_row_finished (RuntimeError: observer bug)"
            in caplog.text)
