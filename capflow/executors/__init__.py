"""Executors: what carries a run out. ``executor=local`` (the default) runs capflow's engine in
this process; a plugin can add others (``executor=ray`` from plugins/capflow-ray)."""

from capflow.executors.base import Executor, Job
from capflow.executors.local import LocalExecutor

__all__ = ["Executor", "Job", "LocalExecutor"]
