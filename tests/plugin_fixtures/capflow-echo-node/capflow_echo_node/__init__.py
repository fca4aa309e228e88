"""Test fixture: adds ``serving=echo`` as a typed config node (no YAML, no serving class of its
own: it registers and reuses ``capflow_echo.EchoServing`` with another prefix, since a run only
builds registered classes), and implements the observer hooks, appending one JSON line per call
to the file named by ``CAPFLOW_FIXTURE_EVENTS``."""

from __future__ import annotations

import json
import os

from capflow import hookimpl

EVENTS_ENV = "CAPFLOW_FIXTURE_EVENTS"


def _log(event: dict) -> None:
    path = os.environ.get(EVENTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")


@hookimpl
def capflow_register_servings(register):  # noqa: ANN001
    from capflow_echo import EchoServing

    register("echonode", EchoServing)


@hookimpl
def capflow_register_config(config):  # noqa: ANN001
    node = {"_target_": "capflow_echo.EchoServing", "prefix": "node:", "max_workers": 2}
    config.add_node("serving", "echo", node)


@hookimpl
def capflow_run_start(run):  # noqa: ANN001
    _log({"hook": "run_start", "serving": run.serving, "operator": run.operator,
          "rows": run.rows, "dry_run": run.dry_run})


@hookimpl
def capflow_row_finished(result):  # noqa: ANN001
    _log({"hook": "row_finished", "index": result.index, "row": json.loads(result.line),
          "error": result.error})


@hookimpl
def capflow_run_end(summary):  # noqa: ANN001
    _log({"hook": "run_end", "done": summary.done, "failed": summary.failed,
          "skipped": summary.skipped, "rows": summary.rows})
