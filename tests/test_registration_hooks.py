"""The registration hooks, each through a plugin module loaded the way built-in plugins are:
what it registers is found by name, built from the config, and credited to the plugin."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import capflow.plugins
from capflow.app import build
from capflow.errors import ConfigError
from capflow.operators.base import Operator
from capflow.serving.base import Serving
from capflow.storage.base import Storage

PLUGIN = '''
from capflow import FileStorage, MapStep, hookimpl
from capflow_echo_like import Answering


class Listing(FileStorage):
    """A file storage under another name."""


class Upper(MapStep):
    def apply(self, row):
        return {"upper": str(row.get("text", "")).upper()}


@hookimpl
def capflow_register_servings(register):
    register("answering", Answering)


@hookimpl
def capflow_register_storages(register):
    register("listing", Listing)


@hookimpl
def capflow_register_operators(register):
    register("upper", Upper)


@hookimpl
def capflow_register_config(config):
    config.add_search_path("file://{conf}")
    config.add_node("pipeline", "upper_only", {"steps": {"up": {
        "_target_": "capflow_hooks_demo.Upper"}}})
'''

SERVING = '''
from capflow import Response, Serving, Usage


class Answering(Serving):
    max_workers = 2

    def describe(self):
        return {"serving": "Answering"}

    async def complete(self, request):
        return Response("an answer", Usage(1, 2), "stop", "m")
'''


@pytest.fixture
def demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> capflow.plugins.PluginRegistry:
    """A plugin module ``capflow_hooks_demo`` among the built-in ones, and its YAML option
    ``serving=answering``; returns the registry loaded with it."""
    conf = tmp_path / "conf" / "serving"
    conf.mkdir(parents=True)
    (conf / "answering.yaml").write_text("_target_: capflow_echo_like.Answering\n")
    plugin = PLUGIN.replace("{conf}", str(tmp_path / "conf"))
    (tmp_path / "capflow_hooks_demo.py").write_text(plugin)
    (tmp_path / "capflow_echo_like.py").write_text(SERVING)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(capflow.plugins, "DEFAULT_PLUGINS",
                        (*capflow.plugins.DEFAULT_PLUGINS, "capflow_hooks_demo"))
    capflow.plugins._loaded = None
    yield capflow.plugins.get_plugins()[1]
    for name in ("capflow_hooks_demo", "capflow_echo_like"):
        sys.modules.pop(name, None)


def test_capflow_register_servings_names_a_serving_the_config_builds(demo):
    cls = demo.get("serving", "answering")
    assert cls.__name__ == "Answering"
    assert isinstance(build(OmegaConf.create({"_target_": "capflow_echo_like.Answering"}),
                            Serving, "serving"), cls)
    assert "serving answering" in demo.provided_by("capflow_hooks_demo")


def test_capflow_register_storages_names_a_storage_the_config_builds(demo, tmp_path):
    cls = demo.get("storage", "listing")
    node = OmegaConf.create({"_target_": "capflow_hooks_demo.Listing",
                             "first_entry_file_name": str(tmp_path / "x.jsonl")})
    assert isinstance(build(node, Storage, "storage"), cls)
    assert "storage listing" in demo.provided_by("capflow_hooks_demo")


def test_capflow_register_operators_names_an_operator_the_config_builds(demo):
    cls = demo.get("operator", "upper")
    step = build(OmegaConf.create({"_target_": "capflow_hooks_demo.Upper"}), Operator,
                 "pipeline.steps.up", serving=None)
    assert isinstance(step, cls) and step.apply({"text": "ab"}) == {"upper": "AB"}
    assert "operator upper" in demo.provided_by("capflow_hooks_demo")


def test_an_unregistered_class_is_refused(demo, monkeypatch):
    monkeypatch.setenv(capflow.plugins.DISABLE_ENV, "capflow_hooks_demo")
    capflow.plugins._loaded = None
    with pytest.raises(ConfigError, match="capflow_hooks_demo.Upper is not registered"):
        build(OmegaConf.create({"_target_": "capflow_hooks_demo.Upper"}), Operator,
              "pipeline.steps.up", serving=None)


def test_capflow_register_config_adds_options_the_command_line_composes(demo,
                                                                         capflow_config):
    assert any(p.endswith("/conf") for p in demo.search_paths)
    cfg = capflow_config("serving=answering", "pipeline=upper_only")
    assert cfg.serving._target_ == "capflow_echo_like.Answering"
    assert list(cfg.pipeline.steps) == ["up"]
    provided = demo.provided_by("capflow_hooks_demo")
    assert "serving=answering" in provided and "pipeline=upper_only" in provided
