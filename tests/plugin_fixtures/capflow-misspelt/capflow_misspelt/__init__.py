"""Test fixture: ``capflow_register_servngs`` is a typo for ``capflow_register_servings``.

It is deliberately left unmarked (no ``@hookimpl``): capflow takes any ``capflow_*`` function
as a hook implementation, so the typo must be reported rather than silently ignored.
"""

from __future__ import annotations


class NeverRegistered:
    """The serving the typo keeps from being registered."""


def capflow_register_servngs(register):  # noqa: ANN001
    register("misspelt", NeverRegistered)
