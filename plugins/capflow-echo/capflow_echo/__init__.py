"""capflow-echo: an example plugin adding ``serving=echo``.

The echo serving answers every request locally, without a model: it repeats the last user
text and counts the images. It shows the whole shape of a third-party plugin: a serving class,
a config option (``conf/serving/echo.yaml``) and the two hooks that register them.
"""

from __future__ import annotations

from capflow import hookimpl
from capflow.request import Request, Response, Usage
from capflow.serving import Serving


class EchoServing(Serving):
    """Answers ``"<prefix> <last user text> (<n> images)"`` for every request.

    :param prefix: put before each answer.
    :param max_workers: requests kept in flight.
    """

    def __init__(self, prefix: str = "echo:", max_workers: int = 4) -> None:
        self.prefix = prefix
        self.max_workers = max_workers

    def describe(self) -> dict:
        return {"serving": "EchoServing", "prefix": self.prefix}

    async def complete(self, request: Request) -> Response:
        text = ""
        for message in request.messages:
            if message["role"] != "user":
                continue
            content = message["content"]
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
            text = " ".join(p["text"] for p in parts if p["type"] == "text") or text
        answer = f"{self.prefix} {text} ({request.image_count} images)"
        return Response(answer, Usage(len(text.split()), len(answer.split())), "stop", "echo")


@hookimpl
def capflow_register_servings(register):  # noqa: ANN001
    register("echo", EchoServing)


@hookimpl
def capflow_register_config(config):  # noqa: ANN001
    config.add_search_path("pkg://capflow_echo.conf")
