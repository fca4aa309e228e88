"""PromptedVQAGenerator: ask a vision-language model about each row's images."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from capflow import templates
from capflow.conversation import build_messages
from capflow.errors import ConfigError, RowError
from capflow.images import ImagePreparer, estimate_image_tokens
from capflow.operators.base import Operator
from capflow.request import Request, Response
from capflow.rows import Row
from capflow.structured import InvalidAnswer, OutputSchema

if TYPE_CHECKING:
    from capflow.serving.base import Serving


class PromptedVQAGenerator(Operator):
    """Captions (or answers questions about) the images of each row.

    :param serving: the serving that answers the requests.
    :param system_prompt: sent as the system message of every request.
    :param user_prompt: the question when a row has neither a conversation nor a prompt column;
        a template: ``{title}`` or ``{meta.source}`` is the row's field (``capflow.templates``),
        and a row without it fails with ``MissingField``.
    :param input_conversation_key: the row key holding the conversation turns.
    :param input_prompt_key: a row key holding a plain-text question (used without a
        conversation).
    :param input_image_key: the row key holding one image reference or a list of them (None:
        a text-only step, which sends no image).
    :param output_answer_key: the row key the answer is written to.
    :param image_detail: ``low``, ``high`` or ``auto``, passed to the API with each image.
    :param image_io: how images are checked and encoded (default: ``ImagePreparer()``).
    :param require_image: a row without images fails with ``NoImage`` (the default, for
        captioning); False asks such rows their question as text alone.
    :param output_schema: a JSON Schema the answer must match (``capflow.structured``); the
        parsed object is written under ``output_answer_key``. None: plain text answers.
    :param output_mode: how the schema is asked for: ``json_schema``, ``json_object`` or
        ``prompt``.
    :param max_reasks: times an answer that does not match the schema is asked again, with the
        reason (each counted as a retry), before the row fails with ``InvalidAnswer``.
    """

    def __init__(
        self,
        serving: Serving,
        system_prompt: str | None = None,
        user_prompt: str | None = None,
        input_conversation_key: str | None = "conversation",
        input_prompt_key: str | None = None,
        input_image_key: str = "image",
        output_answer_key: str = "answer",
        image_detail: str | None = None,
        image_io: ImagePreparer | None = None,
        require_image: bool = True,
        output_schema: dict[str, Any] | None = None,
        output_mode: str = "json_schema",
        max_reasks: int = 3,
    ) -> None:
        self.serving = serving
        self.system_prompt = system_prompt
        self.user_prompt = user_prompt
        self.input_conversation_key = input_conversation_key
        self.input_prompt_key = input_prompt_key
        self.input_image_key = input_image_key
        self.output_answer_key = output_answer_key
        self.image_detail = image_detail
        self.image_io = image_io or ImagePreparer()
        self.require_image = bool(require_image) and input_image_key is not None
        self.schema = (OutputSchema(output_schema, output_mode, name=output_answer_key)
                       if output_schema is not None else None)
        if int(max_reasks) < 0:
            raise ConfigError(f"max_reasks must be >= 0, not {max_reasks}")
        self.max_reasks = int(max_reasks)

    def describe(self) -> dict[str, Any]:
        return {
            "operator": type(self).__name__,
            "system_prompt": self.system_prompt,
            "user_prompt": self.user_prompt,
            "keys": [
                self.input_conversation_key,
                self.input_prompt_key,
                self.input_image_key,
                self.output_answer_key,
            ],
            "image_detail": self.image_detail,
            "image_io": self.image_io.describe(),
            "require_image": self.require_image,
            **({"schema": self.schema.describe()} if self.schema else {}),
        }

    def _turns(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        key = self.input_conversation_key
        conversation = data.get(key) if key else None
        if conversation:
            if not isinstance(conversation, list):
                raise RowError(
                    "BadConversation",
                    f"{self.input_conversation_key!r} must be a list of turns",
                )
            return conversation
        question = data.get(self.input_prompt_key) if self.input_prompt_key else None
        if not question and self.user_prompt:
            question = templates.render(self.user_prompt, data, "user_prompt")
        if not question:
            raise RowError(
                "NoPrompt",
                f"row has no {self.input_conversation_key!r} and no prompt is configured",
            )
        return [{"from": "human", "value": str(question)}]

    def prepare(self, row: Row, base_dir: Path) -> Request:
        refs = row.data.get(self.input_image_key) if self.input_image_key else []
        if refs is None:
            if self.require_image:
                raise RowError("NoImage", f"row has no {self.input_image_key!r} key")
            refs = []
        if not isinstance(refs, list):
            refs = [refs]
        if not refs and self.require_image:
            raise RowError("NoImage", f"row's {self.input_image_key!r} list is empty")
        turns = self._turns(row.data)
        images = [self.image_io.prepare(ref, base_dir) for ref in refs]
        system = self.system_prompt
        body: dict[str, Any] = {}
        if self.schema is not None:
            system = f"{system}\n\n{self.schema.instruction()}" if system else \
                self.schema.instruction()
            response_format = self.schema.response_format()
            if response_format:
                body["response_format"] = response_format
        messages = build_messages(
            turns, [img.url for img in images], system, self.image_detail
        )
        image_tokens = sum(
            estimate_image_tokens(img.width, img.height, self.image_detail) for img in images
        )
        text = sum(len(str(t.get("value", t.get("content", "")) or "")) for t in turns)
        text_tokens = (text + len(system or "")) // 4  # ~4 characters a token
        return Request(messages, sum(img.size for img in images), len(images),
                       image_tokens + text_tokens, image_tokens, body)

    def apply(self, row: Row, response: Response) -> dict[str, Any]:
        if self.schema is None:
            return {self.output_answer_key: response.text}
        return {self.output_answer_key: self.schema.parse(response.text)}

    def reask(self, request: Request, response: Response, error: RowError,
              attempt: int) -> Request | None:
        if self.schema is None or not isinstance(error, InvalidAnswer) or \
                attempt >= self.max_reasks:
            return None
        turns = self.schema.reask_turns(response.text, error)
        extra = sum(len(t["content"]) for t in turns) // 4
        return Request([*request.messages, *turns], request.image_bytes, request.image_count,
                       request.estimated_tokens + extra, request.image_tokens, request.body)
