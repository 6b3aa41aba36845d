"""Instruction-data handlers (``--handler-name``): raw records -> conversations.

Names follow MindSpeed-LLM's: ``AlpacaStyleInstructionHandler`` (instruction / input / output,
optional system and history) and ``SharegptStyleInstructionHandler`` (a message list with
role tags; ShareGPT ``from``/``value`` and OpenAI ``role``/``content`` spellings). Column names
come from ``--map-keys`` (a JSON object), merged over the defaults below.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mindspeed_train.data.readers import DataError, Record


@dataclass(frozen=True)
class Conversation:
    """A system prompt (None: the template's default) and (user, assistant) turns in order."""

    system: str | None
    turns: tuple[tuple[str, str], ...]


ALPACA_KEYS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"}
SHAREGPT_KEYS = {"messages": "conversations", "system": "system"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "system_tag": "system"}


def parse_map_keys(text: str | None) -> dict[str, Any]:
    """``--map-keys`` JSON -> dict; ValueError naming the flag when it is not a JSON object."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--map-keys is not valid JSON ({exc.msg}); pass e.g. '{{\"prompt\": \"question\"}}'") from None
    if not isinstance(value, dict):
        raise ValueError("--map-keys must be a JSON object mapping our names to your column names")
    return value


def _text(record: Record, key: str, required: bool) -> str | None:
    value = record.data.get(key)
    if value is None:
        if required:
            keys = ", ".join(sorted(record.data)[:8])
            raise DataError(f"{record.where}: no key {key!r} (keys: {keys}); set --map-keys to name your column")
        return None
    if not isinstance(value, str):
        raise DataError(f"{record.where}: key {key!r} holds a {type(value).__name__}, expected a string")
    return value


def alpaca(record: Record, map_keys: dict[str, Any]) -> Conversation:
    """Alpaca: prompt = instruction + "\\n" + input (when input is set); history = [[q, a], ...]."""
    keys = {**ALPACA_KEYS, **map_keys}
    prompt = _text(record, keys["prompt"], required=True)
    query = _text(record, keys["query"], required=False)
    response = _text(record, keys["response"], required=True)
    history = record.data.get(keys["history"]) or []
    turns = []
    for pair in history:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{record.where}: {keys['history']!r} must be a list of [question, answer] string pairs")
        turns.append((pair[0], pair[1]))
    turns.append((f"{prompt}\n{query}" if query else prompt, response))
    return Conversation(_text(record, keys["system"], required=False), tuple(turns))


def sharegpt(record: Record, map_keys: dict[str, Any]) -> Conversation:
    """ShareGPT / OpenAI messages: alternating user and assistant, an optional leading system."""
    keys = {**SHAREGPT_KEYS, **{k: v for k, v in map_keys.items() if k != "tags"}}
    if "messages" not in map_keys and keys["messages"] not in record.data and "messages" in record.data:
        keys["messages"] = "messages"  # OpenAI-style files name the list "messages"
    messages = record.data.get(keys["messages"])
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{record.where}: {keys['messages']!r} must be a non-empty list of messages; set --map-keys")
    tags = dict(OPENAI_TAGS if "from" not in messages[0] and "role" in messages[0] else SHAREGPT_TAGS)
    tags.update(map_keys.get("tags", {}))
    system = _text(record, keys["system"], required=False)
    roles, contents = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or tags["role_tag"] not in msg or tags["content_tag"] not in msg:
            raise DataError(f"{record.where}: message {i} needs {tags['role_tag']!r} and {tags['content_tag']!r} keys")
        roles.append(msg[tags["role_tag"]])
        contents.append(msg[tags["content_tag"]])
    if roles[0] == tags["system_tag"]:
        system, roles, contents = contents[0], roles[1:], contents[1:]
    return Conversation(system, _pair_turns(record, roles, contents, tags))


def _pair_turns(record: Record, roles: list, contents: list, tags: dict) -> tuple[tuple[str, str], ...]:
    if len(roles) % 2:  # a trailing user message has no answer to learn from
        roles, contents = roles[:-1], contents[:-1]
    turns = []
    for i in range(0, len(roles), 2):
        if roles[i] != tags["user_tag"] or roles[i + 1] != tags["assistant_tag"]:
            raise DataError(f"{record.where}: messages must alternate {tags['user_tag']!r} then {tags['assistant_tag']!r}; "
                            f"got {roles[i]!r}, {roles[i + 1]!r} at message {i} (tool calls are not supported yet)")
        if not isinstance(contents[i], str) or not isinstance(contents[i + 1], str):
            raise DataError(f"{record.where}: message {i} content must be a string")
        turns.append((contents[i], contents[i + 1]))
    if not turns:
        raise DataError(f"{record.where}: no complete (user, assistant) turn")
    return tuple(turns)


HANDLERS: dict[str, Callable[[Record, dict[str, Any]], Conversation]] = {
    "AlpacaStyleInstructionHandler": alpaca,
    "SharegptStyleInstructionHandler": sharegpt,
}


def get_handler(name: str) -> Callable[[Record, dict[str, Any]], Conversation]:
    """The handler called ``name``; ValueError listing the known handlers otherwise."""
    try:
        return HANDLERS[name]
    except KeyError:
        raise ValueError(f"--handler-name {name!r} is unknown; choose one of {', '.join(HANDLERS)}") from None
