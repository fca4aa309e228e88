"""The hooks a capflow plugin can implement.

A plugin is any module or object with functions named after these hooks. Mark them with
``capflow.hookimpl`` (or just give them the exact name: a function whose name starts with
``capflow_`` is taken as a hook implementation, and a misspelt one is an error, never a silent
no-op). Declare the plugin in your package's ``pyproject.toml``::

    [project.entry-points.capflow]
    echo = "capflow_echo"

Every hook is documented with an example in ``docs/plugins.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from capflow.plugins import ComponentRegister, ConfigRegistry
    from capflow.run import RowResult, RunInfo, RunSummary

hookspec = pluggy.HookspecMarker("capflow")
hookimpl = pluggy.HookimplMarker("capflow")


@hookspec
def capflow_register_servings(register: ComponentRegister) -> None:
    """Register serving classes (subclasses of ``capflow.serving.Serving``).

    :param register: call ``register(name, cls)`` once per serving. The name is how the serving
        is listed by ``capflow plugins``; two plugins registering one name is an error.

    Example::

        @hookimpl
        def capflow_register_servings(register):
            register("echo", EchoServing)
    """


@hookspec
def capflow_register_storages(register: ComponentRegister) -> None:
    """Register storage classes (subclasses of ``capflow.storage.Storage``).

    :param register: call ``register(name, cls)`` once per storage.

    Example::

        @hookimpl
        def capflow_register_storages(register):
            register("parquet", ParquetStorage)
    """


@hookspec
def capflow_register_operators(register: ComponentRegister) -> None:
    """Register operator classes (subclasses of ``capflow.operators.Operator``).

    :param register: call ``register(name, cls)`` once per operator.

    Example::

        @hookimpl
        def capflow_register_operators(register):
            register("tagger", TagGenerator)
    """


@hookspec
def capflow_register_executors(register: ComponentRegister) -> None:
    """Register executor classes (subclasses of ``capflow.executors.Executor``): what carries
    a run out, chosen with ``executor=<name>``.

    :param register: call ``register(name, cls)`` once per executor.

    Example::

        @hookimpl
        def capflow_register_executors(register):
            register("ray", RayExecutor)
    """


@hookspec
def capflow_register_config(config: ConfigRegistry) -> None:
    """Add options to capflow's config groups.

    :param config: ``config.add_search_path("pkg://your_pkg.conf")`` puts a YAML tree on the
        config search path: each folder in it is a group (``serving/``, ``prompt/``, ...) and each
        YAML file an option of that group. ``config.add_node(group, name, node)`` adds one option
        as a typed node (a dataclass or dict) instead. An option name that another plugin
        already provides is an error naming both plugins.

    Example::

        @hookimpl
        def capflow_register_config(config):
            config.add_search_path("pkg://capflow_echo.conf")   # adds serving=echo
            config.add_node("prompt", "haiku", {"system": "Answer in a haiku.", "user": None})
    """


@hookspec
def capflow_run_start(run: RunInfo) -> None:
    """Observe the start of an operator run over one storage step.

    :param run: what is about to run: the step's input and output, the operator, the serving,
        the number of rows (``None`` when it is not known in advance) and ``config``, the
        composed config of a command-line run (resolved, no secrets in it).

    Example::

        @hookimpl
        def capflow_run_start(run):
            print(f"captioning {run.input} -> {run.output}")
            print("model:", run.config.get("model_name"))
    """


@hookspec
def capflow_row_finished(result: RowResult) -> None:
    """Observe each row as this run finishes it: captioned or failed.

    Rows that a resumed run skips (an earlier run finished them) are only counted, in the
    summary's ``skipped``.

    Called on the event loop that keeps requests in flight: keep it quick.

    :param result: the row's index, its output row, the error record when it failed, and how
        it went: ``queued``, ``sent`` and ``answered`` (``time.monotonic()`` seconds; None when
        nothing was sent or no answer came), ``attempts`` (its requests, retries included) and
        ``cached`` (the response cache answered).

    Example::

        @hookimpl
        def capflow_row_finished(result):
            if result.error:
                metrics.increment("capflow.failed", tags=[result.error["type"]])
            if result.sent is not None:
                metrics.timing("capflow.latency", result.answered - result.sent)
    """


@hookspec
def capflow_run_end(summary: RunSummary) -> None:
    """Observe the end of a run, with its counts (done, failed, skipped, tokens, elapsed).

    Example::

        @hookimpl
        def capflow_run_end(summary):
            slack.post(f"capflow: {summary.done} captioned, {summary.failed} failed")
    """
