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


def test_capflow_register_executors_names_the_executor_a_run_uses(tmp_path, monkeypatch,
                                                                  capflow_config):
    """A plugin's executor is chosen with executor=<name> and carries the run out."""
    (tmp_path / "capflow_exec_demo.py").write_text('''
from capflow import LocalExecutor, hookimpl

RAN = []


class Counting(LocalExecutor):
    def run(self, job):
        RAN.append([name for name, _ in job.steps])
        return super().run(job)


@hookimpl
def capflow_register_executors(register):
    register("counting", Counting)


@hookimpl
def capflow_register_config(config):
    config.add_node("executor", "counting", {"_target_": "capflow_exec_demo.Counting"})
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(capflow.plugins, "DEFAULT_PLUGINS",
                        (*capflow.plugins.DEFAULT_PLUGINS, "capflow_exec_demo"))
    capflow.plugins._loaded = None
    registry = capflow.plugins.get_plugins()[1]
    try:
        assert registry.get("executor", "counting").__name__ == "Counting"
        assert registry.get("executor", "local").__name__ == "LocalExecutor"
        assert "executor counting" in registry.provided_by("capflow_exec_demo")
        from capflow import _hydra_bridge
        from capflow.app import run_job

        _hydra_bridge.install(registry)  # the kit's config was set up before this plugin
        cfg = capflow_config("executor=counting", f"storage.cache_path={tmp_path / 'c'}")
        summaries = run_job(cfg)  # no api_url: a dry run, carried out by the plugin's executor
        assert sys.modules["capflow_exec_demo"].RAN == [["caption"]]
        assert summaries[0].dry_run and summaries[0].rows == 6
    finally:
        sys.modules.pop("capflow_exec_demo", None)
