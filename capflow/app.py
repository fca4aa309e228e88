"""The Hydra job: build storage, serving and pipeline from the composed config, and run."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from capflow import sweep
from capflow.engine import EngineSettings
from capflow.errors import ConfigError
from capflow.executors import Executor, Job, LocalExecutor
from capflow.images import ImagePreparer
from capflow.manifest import RunContext
from capflow.operators.base import Operator
from capflow.retry import RetryPolicy
from capflow.run import RunSummary
from capflow.serving.base import Serving
from capflow.stop_rules import StopRules
from capflow.storage.base import Storage

log = logging.getLogger("capflow")


def build(node: DictConfig, base: type, where: str, **kwargs: Any) -> Any:
    """Instantiate ``node`` and check it is a ``base``; errors name the config node."""
    if "_target_" not in node:
        raise ConfigError(f"{where} has no _target_ naming its class")
    try:
        cls = get_class(node._target_)
    except Exception:
        raise ConfigError(f"{where}: cannot import _target_ {node._target_}") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{where}: {node._target_} is not a capflow {base.__name__}")
    _check_registered(cls, base, where, node._target_)
    if not getattr(cls, "sends_requests", True):
        kwargs.pop("serving", None)  # a step that sends nothing (a MapStep) is given no serving
    try:
        obj = instantiate(node, **kwargs, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        reason = str(cause) if cause else str(exc).splitlines()[0]
        raise ConfigError(f"{where} ({node._target_}) could not be built: {reason}") from None
    return obj


def _check_registered(cls: type, base: type, where: str, target: str) -> None:
    """What a run builds must come from an enabled plugin: a class no plugin registered (or one
    of a plugin switched off) is a configuration error, not something run anyway."""
    from capflow.plugins import get_plugins

    if get_plugins()[1].registers(cls):
        return
    kind = base.__name__.lower()
    raise ConfigError(f"{where}: {target} is not registered by any enabled plugin (a plugin"
                      f" registers it with the capflow_register_{kind}s hook; capflow plugins"
                      " lists what is registered)")


def _in_job_dir(path: str | None) -> str | None:
    """In a sweep, relative paths go into each job's own folder so jobs never share files."""
    if path is None or Path(path).is_absolute():
        return path
    if not HydraConfig.initialized():  # built outside a command-line run (a worker process)
        return path
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return path
    return str(Path(hydra.runtime.output_dir) / path)


def _by_name(container: object) -> dict[str, Any]:
    """A config's plain dict keyed by ``str`` (``{}`` for anything else): a config's keys are
    names, though omegaconf types a dict's keys more widely."""
    return {str(k): v for k, v in container.items()} if isinstance(container, dict) else {}


def run_context(cfg: DictConfig) -> RunContext:
    """The command line, the resolved config and the plugins, for the run's manifest."""
    from capflow.plugins import get_plugin_manager
    from capflow.redaction import redact

    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation only a node's own code understands: keep it as typed
        config = OmegaConf.to_container(cfg, resolve=False)
    pm = get_plugin_manager()
    plugins = [{"name": pm.get_name(plugin) or "", "package": dist.project_name,
                "version": dist.version} for plugin, dist in pm.list_plugin_distinfo()]
    from capflow import option_files

    typed = option_files.typed_argv or sys.argv[1:]
    command = ["capflow", *(redact(arg) for arg in typed)]
    return RunContext(command=command, config=_by_name(config),
                      plugins=plugins, sweep=sweep.context())


def build_job(cfg: DictConfig) -> tuple[Job, str | None]:
    """The run ``cfg`` describes, its parts built, and why it must be a dry run (None when it
    need not be)."""
    steps_cfg = cfg.pipeline.get("steps")
    if not steps_cfg:
        raise ConfigError("pipeline.steps is empty: nothing to run")
    storage_cfg = cfg.storage.copy()
    if "cache_path" in storage_cfg:
        storage_cfg.cache_path = _in_job_dir(storage_cfg.cache_path)
    storage = build(storage_cfg, Storage, "storage")
    serving = build(cfg.serving, Serving, "serving")
    operators = [
        build(node, Operator, f"pipeline.steps.{name}", serving=serving)
        for name, node in steps_cfg.items()
    ]
    output = _in_job_dir(cfg.get("output"))
    dry_run = bool(cfg.dry_run)
    # A pipeline of steps that send nothing (map and filter steps) needs no server.
    why_dry = serving.unavailable() if any(op.sends_requests for op in operators) else None
    if why_dry and not dry_run:
        log.info("%s: running a dry run (nothing will be sent)", why_dry)
        dry_run = True
    settings = engine_settings(cfg)
    for op in operators:  # a filter's file of dropped rows, like every output, is the job's
        if isinstance(getattr(op, "dropped_output", None), str):
            op.dropped_output = _in_job_dir(op.dropped_output)
    if dry_run:  # a dry run reads the prepared-image cache but makes none, as the responses'
        for op in operators:
            if isinstance(getattr(op, "image_io", None), ImagePreparer):
                op.image_io.make_no_cache()
    names = list(steps_cfg)
    context = settings.run_context
    job = Job(storage=storage, serving=serving, steps=list(zip(names, operators, strict=True)),
              settings=settings, output=output, dry_run=dry_run,
              config=dict(context.config) if context else {})
    return job, why_dry


def engine_settings(cfg: DictConfig) -> EngineSettings:
    """The engine's settings from the config's top-level keys."""
    retry = OmegaConf.to_container(cfg.retry)
    assert isinstance(retry, dict)  # retry is a config node of named fields, never a list
    return EngineSettings(
        retry=RetryPolicy(**_by_name(retry)),
        cache_path=cfg.cache.path if cfg.cache.enabled else None,
        stop=StopRules(
            max_failures=cfg.max_failures,
            max_tokens_total=cfg.max_tokens_total,
            max_cost=cfg.max_cost,
            prompt_price=cfg.price.prompt_per_million,
            completion_price=cfg.price.completion_per_million,
        ),
        rpm=cfg.rpm,
        tpm=cfg.tpm,
        retry_failed=bool(cfg.retry_failed),
        failed_output=_in_job_dir(cfg.failed_output),
        progress=bool(cfg.progress),
        progress_interval=float(cfg.get("progress_interval", 10)),
        adaptive=bool(cfg.adaptive),
        outage_s=float(cfg.stop.outage_s),
        accept_truncated=bool(cfg.accept_truncated),
        share_endpoints=bool(cfg.cache.share_endpoints),
        run_context=run_context(cfg),
    )


def run_job(cfg: DictConfig) -> list[RunSummary]:
    """Run every pipeline step of ``cfg`` with the chosen executor; returns one summary per step
    that ran."""
    executor = build(cfg.executor, Executor, "executor") if "executor" in cfg else \
        LocalExecutor()
    job, why_dry = build_job(cfg)
    summaries = executor.run(job)
    if why_dry:
        print(
            f"\nNothing was sent: {why_dry}. To caption for real, point capflow at a server:\n"
            "  capflow api_url=http://127.0.0.1:8000/v1   "
            "(any OpenAI-compatible API; add model_name=... if it serves several models)"
        )
    elif job.dry_run:
        print("\nDry run: nothing was sent. Drop dry_run=true to caption for real.")
    return summaries
