"""``capflow batches cancel OUTPUT``: cancel the batches a ``serving=openai_batch`` run submitted
and has not collected.

The run's manifest (``OUTPUT.run.json``) names its config: the batch ledger, the API's URL and
the name of the key's environment variable. Each batch the ledger lists as submitted and not
collected is cancelled on the server and marked collected; rows it carried fail on the next run
with the server's word and are submitted again only when asked again.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from capflow import manifest
from capflow.errors import CapflowError, ConfigError

USAGE = "usage: capflow batches cancel OUTPUT   (the output of a serving=openai_batch run)"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "cancel":
        print(USAGE, file=sys.stderr)
        return 2
    try:
        cancelled = cancel(Path(argv[1]))
    except CapflowError as exc:
        print(f"capflow batches: error: {exc}", file=sys.stderr)
        return 2
    print(f"cancelled {len(cancelled)} batch(es){': ' if cancelled else ''}"
          f"{', '.join(cancelled)}")
    return 0


def cancel(output: Path) -> list[str]:
    """Cancel the open batches of the run that wrote ``output``; their ids."""
    from openai import OpenAI

    from capflow.serving.batch_ledger import BatchLedger

    record = Path(f"{output}{manifest.SUFFIX}")
    try:
        config = json.loads(record.read_text(encoding="utf-8")).get("config") or {}
    except (OSError, ValueError):
        raise ConfigError(f"no run record at {record}: name the output of a capflow run"
                          ) from None
    serving = config.get("serving") or {}
    ledger_path, api_url = serving.get("ledger"), serving.get("api_url")
    if not ledger_path or not api_url:
        raise ConfigError(f"{output} was not written by a serving=openai_batch run")
    if isinstance(api_url, list):
        api_url = api_url[0]
    ledger = BatchLedger(Path(ledger_path))
    key_name = serving.get("key_name_of_api_key")
    key = os.environ.get(key_name) if key_name else None
    client = OpenAI(base_url=api_url, api_key=key or "none")
    cancelled = []
    try:
        for batch in ledger.open_batches():
            if batch.remote and batch.remote != "file":
                client.batches.cancel(batch.remote)
                ledger.collected(batch.local)
                cancelled.append(batch.remote)
    finally:
        ledger.close()
        client.close()
    return cancelled
