"""capflow-dedup: drops near-duplicate images before they are captioned.

It adds the operator ``DedupStep`` (a ``capflow.MapStep``: it sends no request) and the option
``pipeline=dedup_caption``, which dedups the rows, then captions the ones kept::

    capflow pipeline=dedup_caption input=photos/ output=out.jsonl api_url=http://127.0.0.1:8000/v1

Each image gets a perceptual hash; a row whose hash is within ``max_distance`` bits of a row
kept before it is dropped, and listed with the row it duplicates in a ``.dropped.jsonl`` file.
"""

from __future__ import annotations

from capflow import hookimpl
from capflow_dedup.index import HammingIndex
from capflow_dedup.step import DedupStep

__all__ = ["DedupStep", "HammingIndex"]


@hookimpl
def capflow_register_operators(register):  # noqa: ANN001 - see capflow.hookspecs
    register("dedup", DedupStep)


@hookimpl
def capflow_register_config(config):  # noqa: ANN001 - see capflow.hookspecs
    config.add_search_path("pkg://capflow_dedup.conf")  # pipeline=dedup_caption
