"""Registers the built-in operators, exactly as a third-party plugin would."""

from capflow.hookspecs import hookimpl
from capflow.operators.prompted_vqa import PromptedVQAGenerator
from capflow.operators.row_filter import RowFilter


@hookimpl
def capflow_register_operators(register):  # noqa: ANN001 - see capflow.hookspecs
    register("prompted_vqa", PromptedVQAGenerator)
    register("row_filter", RowFilter)
