"""Conversations: checking message lists and turning them into (token ids, trained) segments, in SOLAR's
prompt format or through the tokenizer's chat template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..config import PROMPT_FORMATS
from .tokens import _encode_one

_ROLES = ("system", "user", "assistant")

# docs/method.md#prompt-format, and the chat template shipped with upstage/SOLAR-10.7B-Instruct-v1.0 (which also gives
# the system header). One assistant turn: USER_HEADER + prompt + "\n\n" + ASSISTANT_HEADER + response.
SYSTEM_HEADER = "### System:\n"
USER_HEADER = "### User:\n"
ASSISTANT_HEADER = "### Assistant:\n"


def _messages_of(value, index: int, field: str, caller: str) -> list[dict]:
    """``value`` checked to be a list of {"role", "content"} messages; returned as plain dicts."""
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise ValueError(
            f"{caller}: record {index} field {field!r} is {type(value).__name__}, expected a list of "
            f'{{"role": "system"|"user"|"assistant", "content": str}} messages'
        )
    messages = []
    for k, message in enumerate(value):
        if (
            not isinstance(message, Mapping)
            or message.get("role") not in _ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise ValueError(
                f"{caller}: record {index} field {field!r} message {k} is {message!r}, expected "
                f'{{"role": "system"|"user"|"assistant", "content": str}}'
            )
        if message["role"] == "system" and k != 0:
            raise ValueError(
                f"{caller}: record {index} field {field!r}: a system message must come first (got one at {k})"
            )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _check_turns(messages: list[dict], index: int, field: str, caller: str, *, last: str) -> None:
    """After an optional system message, roles alternate user, assistant, ...; the last one is ``last``."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    roles = [m["role"] for m in turns]
    expected = ["user" if k % 2 == 0 else "assistant" for k in range(len(roles))]
    if not roles or roles != expected or roles[-1] != last:
        raise ValueError(
            f"{caller}: record {index} field {field!r} has roles {[m['role'] for m in messages]}, expected "
            f"an optional system message, then user and assistant alternating, starting with user and "
            f"ending with {last}"
        )


def _string_field(record, index: int, field: str, caller: str, expected: str) -> str:
    if field not in record:
        raise ValueError(f"{caller}: record {index} has no {field!r} field (has {sorted(record)}); expected {expected}")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{caller}: record {index} field {field!r} is {type(value).__name__}, expected str")
    return value


def _solar_segments(tokenizer, messages: list[dict], *, generation_prompt: bool) -> list[tuple[list[int], bool]]:
    """(token ids, trained) segments of a conversation in SOLAR's format (docs/method.md#prompt-format).

    ``[### System:\\n{system}\\n\\n]`` then per turn ``### User:\\n{user}\\n\\n### Assistant:\\n``
    (not trained) and ``{assistant}`` + eos (trained); turns follow each other directly, the eos
    between them. This is the text of upstage's SOLAR-Instruct chat template with an eos closing each
    answer. ``generation_prompt``: the messages end with a user turn; close with the assistant header.
    """
    eos = tokenizer.eos_token_id
    segments: list[tuple[list[int], bool]] = []
    pending = ""  # untrained text not yet tokenized
    for message in messages:
        if message["role"] == "system":
            pending += SYSTEM_HEADER + message["content"] + "\n\n"
        elif message["role"] == "user":
            pending += USER_HEADER + message["content"] + "\n\n" + ASSISTANT_HEADER
        else:
            segments.append((_encode_one(tokenizer, pending), False))
            segments.append((_encode_one(tokenizer, message["content"]) + [eos], True))
            pending = ""
    if pending:
        assert generation_prompt, "a conversation to train on ends with an assistant message"
        segments.append((_encode_one(tokenizer, pending), False))
    return segments


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _template_segments(tokenizer, messages: list[dict], index: int, caller: str) -> list[tuple[list[int], bool]]:
    """(token ids, trained) segments of a conversation rendered by the tokenizer's chat template.

    Each assistant message's text is what rendering ``messages[:k+1]`` adds to rendering
    ``messages[:k]`` with the generation prompt; the template must render conversations as prefixes
    of each other (every common template does). An assistant segment that does not contain eos gets
    one appended, so the model learns to stop.
    """
    eos = tokenizer.eos_token_id
    segments: list[tuple[list[int], bool]] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:k], add_generation_prompt=True)
        full = _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(
                f"{caller}: record {index}: the tokenizer's chat template does not render the conversation "
                f"up to message {k} as an extension of the earlier turns, so the assistant's tokens cannot "
                f"be located; use prompt_format='solar' or a prefix-stable template"
            )
        answer = _encode_one(tokenizer, full[len(prompt) :], parse_special=True)
        if eos not in answer:
            answer.append(eos)
        segments.append((_encode_one(tokenizer, prompt[len(done) :], parse_special=True), False))
        segments.append((answer, True))
        done = full
    return segments


def _template_prompt(tokenizer, messages: list[dict]) -> list[int]:
    return _encode_one(tokenizer, _render(tokenizer, messages, add_generation_prompt=True), parse_special=True)


def _check_prompt_format(tokenizer, prompt_format: str, caller: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"{caller}: prompt_format={prompt_format!r}, expected one of {PROMPT_FORMATS}")
    if prompt_format == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{caller}: prompt_format='chat_template' but the tokenizer has no chat template "
            f"(tokenizer.chat_template is empty); set one or use prompt_format='solar'"
        )


def solar_prompt(prompt: str, *, system: str | None = None) -> str:
    """The text a SOLAR-format model is prompted with: what SFT trains it to answer after."""
    head = (SYSTEM_HEADER + system + "\n\n") if system else ""
    return head + USER_HEADER + prompt + "\n\n" + ASSISTANT_HEADER
