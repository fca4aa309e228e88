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


def test_capflow_run_end_follows_the_start_and_every_finished_row(server, tmp_path):
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


class Timer:
    def __init__(self) -> None:
        self.config: dict | None = None
        self.rows: list = []

    @hookimpl
    def capflow_run_start(self, run):
        self.config = run.config

    @hookimpl
    def capflow_row_finished(self, result):
        self.rows.append(result)


def test_capflow_row_finished_gives_each_rows_timing_attempts_and_cache_hit(tmp_path):
    from capflow.manifest import RunContext
    from capflow.retry import RetryPolicy
    from capflow.testing.server import FakeOpenAIServer

    data, _ = make_dataset(tmp_path, 3)
    timer = Timer()
    pm = get_plugin_manager()
    pm.register(timer, name="test-timer")

    def run(output: str, **settings):  # noqa: ANN003, ANN202
        storage = FileStorage(str(data), cache_path=str(tmp_path / "c"))
        op = PromptedVQAGenerator(OpenAIServing(api_url=server.base_url, model_name="m"),
                                  output_answer_key="caption")
        return op.run(storage.step(output=str(tmp_path / output)), settings=EngineSettings(
            report=False, cache_path=str(tmp_path / "c" / "r.sqlite"), **settings))

    try:
        with FakeOpenAIServer(latency=0.05) as server:
            server.set_faults(rate_500=1.0)
            failed = run("a.jsonl", adaptive=False, run_context=RunContext(
                config={"model_name": "m", "max_workers": 3}),
                retry=RetryPolicy(max_attempts=2, initial_wait=0.01, max_wait=0.01))
            server.set_faults()
            done = run("a.jsonl")
            cached = run("b.jsonl")
    finally:
        pm.unregister(name="test-timer")
    assert timer.config == {}  # the last run came from Python, without a config
    assert (failed.failed, done.done, cached.done) == (3, 3, 3)
    rows = timer.rows
    for r in rows[:3]:  # two tries each, neither answered
        assert (r.attempts, r.cached, r.error["type"]) == (2, False, "ServerError")
        assert r.queued <= r.sent and r.answered is None  # a 500 is no answer
    for r in rows[3:6]:  # answered after the server's 50 ms
        assert (r.attempts, r.cached, r.error) == (1, False, None)
        assert r.queued <= r.sent < r.answered and r.answered - r.sent >= 0.05
    for r in rows[6:]:  # from the cache: nothing sent
        assert (r.attempts, r.cached, r.sent, r.answered) == (0, True, None, None)


def test_capflow_run_start_gives_the_runs_config(tmp_path):
    from capflow.manifest import RunContext

    data, _ = make_dataset(tmp_path, 1)
    timer = Timer()
    pm = get_plugin_manager()
    pm.register(timer, name="test-timer")
    try:
        op = PromptedVQAGenerator(OpenAIServing(api_url=None), output_answer_key="caption")
        op.run(FileStorage(str(data), cache_path=str(tmp_path / "c")).step(), dry_run=True,
               settings=EngineSettings(report=False, run_context=RunContext(
                   config={"model_name": "m", "max_workers": 3})))
    finally:
        pm.unregister(name="test-timer")
    assert timer.config == {"model_name": "m", "max_workers": 3}


def test_observers_are_called_in_pluggys_order_wrappers_included(server, tmp_path, caplog):
    calls: list[str] = []

    class Plain:
        @hookimpl
        def capflow_run_end(self, summary):
            calls.append("plain")

    class First:
        @hookimpl(tryfirst=True)
        def capflow_run_end(self, summary):
            calls.append("tryfirst")

    class Last:
        @hookimpl(trylast=True)
        def capflow_run_end(self, summary):
            calls.append("trylast")

    class Failing:
        @hookimpl
        def capflow_run_end(self, summary):
            calls.append("failing")
            raise RuntimeError("observer bug")

    class Wrapper:
        @hookimpl(wrapper=True)
        def capflow_run_end(self, summary):
            calls.append("wrapper before")
            result = yield
            calls.append(f"wrapper after ({summary.rows} rows)")
            return result

    observers = {"trylast": Last(), "plain": Plain(), "failing": Failing(), "tryfirst": First(),
                 "wrapper": Wrapper()}
    data, _ = make_dataset(tmp_path, 2)
    pm = get_plugin_manager()
    for name, observer in observers.items():
        pm.register(observer, name=f"order-{name}")
    try:
        for _ in range(2):  # a failing observer is skipped for the rest of a run, not forever
            op = PromptedVQAGenerator(OpenAIServing(api_url=server.base_url, model_name="m"),
                                      output_answer_key="caption")
            op.run(FileStorage(str(data), cache_path=str(tmp_path / "c")).step(),
                   settings=EngineSettings(report=False))
    finally:
        for name in observers:
            pm.unregister(name=f"order-{name}")
    # pluggy's order: wrappers around all; tryfirst first; then the latest registered first.
    once = ["wrapper before", "tryfirst", "failing", "plain", "trylast", "wrapper after (2 rows)"]
    assert calls == once + once
    assert caplog.text.count("plugin 'order-failing' failed in capflow_run_end") == 2


def test_capflow_trace_plugins_prints_every_hook_call(tmp_path):
    from conftest import run_capflow

    data, _ = make_dataset(tmp_path, 1)
    traced = run_capflow(f"input={data}", "dry_run=true", cwd=tmp_path,
                         env={"CAPFLOW_TRACE_PLUGINS": "1"})
    assert traced.returncode == 0, traced.stderr
    assert "[capflow trace]   capflow_run_start [hook]" in traced.stderr
    assert "[capflow trace]   capflow_run_end [hook]" in traced.stderr
    quiet = run_capflow(f"input={data}", "dry_run=true", cwd=tmp_path)
    assert "[capflow trace]" not in quiet.stderr
