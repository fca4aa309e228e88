"""capflow-parquet: ``storage=parquet``, Parquet datasets in and out, streamed, with the
input's column types kept (and Hugging Face ``datasets`` exports with embedded images read)."""

from __future__ import annotations

import os

# Arrow's default allocator (mimalloc) keeps the pages of freed batches for reuse: streaming
# many small batches, the system allocator keeps a run ~20 MB smaller. Read when pyarrow is
# first imported, so set before; an explicit ARROW_DEFAULT_MEMORY_POOL still decides.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from capflow import hookimpl
from capflow_parquet.storage import ParquetStorage

__all__ = ["ParquetStorage"]


@hookimpl
def capflow_register_storages(register):  # noqa: ANN001 - see capflow.hookspecs
    register("parquet", ParquetStorage)


@hookimpl
def capflow_register_config(config):  # noqa: ANN001 - see capflow.hookspecs
    config.add_search_path("pkg://capflow_parquet.conf")
