"""Conversations become chat messages with every role kept and images where they belong."""

from __future__ import annotations

import pytest

from capflow.conversation import build_messages
from capflow.errors import RowError


def _kinds(message: dict) -> list[str]:
    content = message["content"]
    if isinstance(content, str):
        return [f"text:{content}"]
    return [p["image_url"]["url"] if p["type"] == "image_url" else f"text:{p['text']}"
            for p in content]


def test_roles_are_kept():
    turns = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "q1"},
        {"from": "gpt", "value": "a1"},
        {"from": "user", "value": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    messages = build_messages(turns, ["img"], system_prompt="P")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "P\n\nS"  # the prompt's and the row's, as one message
    assert _kinds(messages[1]) == ["img", "text:q1"]  # the image goes to the first user turn
    assert _kinds(messages[3]) == ["text:q2"]


def test_conversation_ending_with_an_assistant_turn_still_carries_its_image():
    turns = [{"from": "human", "value": "describe"}, {"from": "gpt", "value": "a cat"}]
    messages = build_messages(turns, ["img"])
    assert _kinds(messages[0]) == ["img", "text:describe"]
    assert messages[-1] == {"role": "assistant", "content": "a cat"}


def test_image_placeholders_place_images_and_are_removed():
    turns = [
        {"from": "human", "value": "first <image> then"},
        {"from": "gpt", "value": "ok"},
        {"from": "human", "value": "<image>\nand this?"},
    ]
    messages = build_messages(turns, ["A", "B"])
    assert _kinds(messages[0]) == ["text:first", "A", "text:then"]
    assert _kinds(messages[2]) == ["B", "text:and this?"]
    assert "<image>" not in str(messages)


def test_several_images_without_placeholders_go_in_order():
    messages = build_messages([{"from": "human", "value": "compare"}], ["A", "B", "C"])
    assert _kinds(messages[0]) == ["A", "B", "C", "text:compare"]


def test_image_detail_is_passed_with_each_image():
    messages = build_messages([{"from": "human", "value": "q"}], ["A"], image_detail="low")
    assert messages[0]["content"][0]["image_url"] == {"url": "A", "detail": "low"}


@pytest.mark.parametrize(
    ("turns", "images", "kind"),
    [
        ([{"from": "human", "value": "<image><image>"}], ["A"], "ImageCountMismatch"),
        ([{"from": "gpt", "value": "hi"}], ["A"], "NoUserTurn"),
        ([{"from": "gpt", "value": "<image>"}], ["A"], "BadConversation"),
        ([{"from": "robot", "value": "x"}], ["A"], "BadConversation"),
        (["not a turn"], ["A"], "BadConversation"),
        ([{"from": "human", "value": 3}], ["A"], "BadConversation"),
    ],
)
def test_bad_conversations_are_row_errors(turns, images, kind):
    with pytest.raises(RowError) as err:
        build_messages(turns, images)
    assert err.value.kind == kind
