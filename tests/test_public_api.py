"""The public API is a promise: the names capflow exports, and the import paths plugins already
use, keep working."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import capflow

PUBLIC = [
    "__version__", "hookimpl",
    "Serving", "Storage", "StreamingStorage", "Operator", "MapStep", "DropRow",
    "Request", "Response", "Usage", "Row",
    "RunInfo", "RowResult", "RunSummary",
    "CapflowError", "ConfigError", "PluginError", "RowError", "ServingError",
    "FileStorage", "OpenAIServing", "PromptedVQAGenerator", "RowFilter", "ImagePreparer",
    "EngineSettings", "Executor", "Job", "LocalExecutor",
]

# Where plugins written against earlier versions import from: these must keep working.
OLD_PATHS = {
    "capflow.hookspecs": ["hookimpl"],
    "capflow.serving": ["Serving", "OpenAIServing"],
    "capflow.storage": ["Storage", "FileStorage"],
    "capflow.operators": ["Operator", "PromptedVQAGenerator", "RowFilter"],
    "capflow.request": ["Request", "Response", "Usage"],
    "capflow.rows": ["Row"],
    "capflow.run": ["RunInfo", "RowResult", "RunSummary"],
    "capflow.errors": ["CapflowError", "ConfigError", "PluginError", "RowError", "ServingError"],
    "capflow.images": ["ImagePreparer"],
    "capflow.engine": ["EngineSettings"],
}


def test_the_exported_names_are_pinned():
    assert capflow.__all__ == PUBLIC
    assert set(capflow._HOMES) == set(PUBLIC) - {"__version__", "hookimpl"}
    assert set(PUBLIC) <= set(dir(capflow))


def test_every_export_is_the_object_its_module_defines():
    for module, names in OLD_PATHS.items():
        for name in names:
            assert getattr(capflow, name) is getattr(importlib.import_module(module), name), name
    assert issubclass(capflow.FileStorage, capflow.Storage)
    assert issubclass(capflow.RowFilter, capflow.Operator)
    assert issubclass(capflow.ServingError, capflow.CapflowError)


def test_an_unknown_name_is_an_attribute_error():
    try:
        capflow.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "no attribute 'NoSuchThing'" in str(exc)
    else:
        raise AssertionError("capflow.NoSuchThing did not raise")


def test_the_package_is_typed_and_import_capflow_stays_cheap():
    assert (Path(capflow.__file__).parent / "py.typed").exists()
    # The command line imports capflow first: the servings and images are not imported with it.
    code = "import capflow, sys; print(sorted(m for m in sys.modules if m.startswith('capflow')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "capflow.serving.openai" not in out and "capflow.images" not in out
