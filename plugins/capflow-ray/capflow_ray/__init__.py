"""capflow-ray: ``executor=ray``, the same pipeline config run as a Ray Data job.

Ray is imported when a run uses the executor, not when capflow loads its plugins: every other
capflow command starts as fast as without this plugin.
"""

from __future__ import annotations

from capflow import hookimpl
from capflow_ray.executor import RayExecutor

__all__ = ["RayExecutor"]


@hookimpl
def capflow_register_executors(register):  # noqa: ANN001 - see capflow.hookspecs
    register("ray", RayExecutor)


@hookimpl
def capflow_register_config(config):  # noqa: ANN001 - see capflow.hookspecs
    config.add_search_path("pkg://capflow_ray.conf")
