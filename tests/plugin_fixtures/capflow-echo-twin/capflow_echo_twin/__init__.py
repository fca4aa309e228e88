"""Test fixture: announced under the entry-point name ``echo``, like capflow-echo, so the two
plugins share one name. Registers the serving ``twin`` so that one can tell which got loaded."""

from __future__ import annotations

from capflow import hookimpl


class TwinServing:
    """Never run: only its registration matters."""


@hookimpl
def capflow_register_servings(register):  # noqa: ANN001
    register("twin", TwinServing)
