"""Operators: each turns a row into a request and the response back into the row."""

from capflow.operators.base import Operator
from capflow.operators.map_step import DropRow, MapStep
from capflow.operators.prompted_vqa import PromptedVQAGenerator
from capflow.operators.row_filter import RowFilter

__all__ = ["DropRow", "MapStep", "Operator", "PromptedVQAGenerator", "RowFilter"]
