"""capflow: caption and question large image datasets with vision-language models behind any
OpenAI-compatible chat-completions API.

The public API, for plugin authors and Python API users, is what this package exports
(``__all__``); the modules behind it may move, these names stay::

    from capflow import FileStorage, OpenAIServing, PromptedVQAGenerator

    storage = FileStorage("data.json", cache_path="./cache_local")
    serving = OpenAIServing(api_url="http://127.0.0.1:8000/v1", model_name="m")
    PromptedVQAGenerator(serving, output_answer_key="caption").run(storage.step())

The names are imported when first used, so ``import capflow`` stays cheap for the command line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from capflow.hookspecs import hookimpl

__version__ = "0.1.0"

# Each public name and the module that defines it.
_HOMES = {
    # Extending capflow: the three kinds of component and what passes between them.
    "Serving": "capflow.serving.base",
    "Storage": "capflow.storage.base",
    "Operator": "capflow.operators.base",
    "MapStep": "capflow.operators.map_step",
    "DropRow": "capflow.operators.map_step",
    "StreamingStorage": "capflow.storage.streaming",
    "Request": "capflow.request",
    "Response": "capflow.request",
    "Usage": "capflow.request",
    "Row": "capflow.rows",
    # What observers are given.
    "RunInfo": "capflow.run",
    "RowResult": "capflow.run",
    "RunSummary": "capflow.run",
    # Errors, each a one-line message.
    "CapflowError": "capflow.errors",
    "ConfigError": "capflow.errors",
    "PluginError": "capflow.errors",
    "RowError": "capflow.errors",
    "ServingError": "capflow.errors",
    # The built-in components, for the Python API.
    "Executor": "capflow.executors.base",
    "Job": "capflow.executors.base",
    "LocalExecutor": "capflow.executors.local",
    "FileStorage": "capflow.storage.file",
    "OpenAIServing": "capflow.serving.openai",
    "PromptedVQAGenerator": "capflow.operators.prompted_vqa",
    "RowFilter": "capflow.operators.row_filter",
    "ImagePreparer": "capflow.images",
    "EngineSettings": "capflow.engine",
}

__all__ = [
    "__version__", "hookimpl",
    "Serving", "Storage", "StreamingStorage", "Operator", "MapStep", "DropRow",
    "Request", "Response", "Usage", "Row",
    "RunInfo", "RowResult", "RunSummary",
    "CapflowError", "ConfigError", "PluginError", "RowError", "ServingError",
    "FileStorage", "OpenAIServing", "PromptedVQAGenerator", "RowFilter", "ImagePreparer",
    "EngineSettings", "Executor", "Job", "LocalExecutor",
]

if TYPE_CHECKING:
    from capflow.engine import EngineSettings
    from capflow.errors import CapflowError, ConfigError, PluginError, RowError, ServingError
    from capflow.executors.base import Executor, Job
    from capflow.executors.local import LocalExecutor
    from capflow.images import ImagePreparer
    from capflow.operators.base import Operator
    from capflow.operators.map_step import DropRow, MapStep
    from capflow.operators.prompted_vqa import PromptedVQAGenerator
    from capflow.operators.row_filter import RowFilter
    from capflow.request import Request, Response, Usage
    from capflow.rows import Row
    from capflow.run import RowResult, RunInfo, RunSummary
    from capflow.serving.base import Serving
    from capflow.serving.openai import OpenAIServing
    from capflow.storage.base import Storage
    from capflow.storage.file import FileStorage
    from capflow.storage.streaming import StreamingStorage


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'capflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # found once, then an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
