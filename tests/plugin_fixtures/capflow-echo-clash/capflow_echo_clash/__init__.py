"""Test fixture: registers a serving named ``echo`` and ships ``serving/echo.yaml``, both of
which capflow-echo provides too."""

from __future__ import annotations

from capflow import hookimpl
from capflow.request import Request, Response
from capflow.serving import Serving


class ClashServing(Serving):
    """Answers ``clash`` to everything."""

    def __init__(self, max_workers: int = 1) -> None:
        self.max_workers = max_workers

    async def complete(self, request: Request) -> Response:
        return Response("clash")


@hookimpl
def capflow_register_servings(register):  # noqa: ANN001
    register("echo", ClashServing)


@hookimpl
def capflow_register_config(config):  # noqa: ANN001
    config.add_search_path("pkg://capflow_echo_clash.conf")
