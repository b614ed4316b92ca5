"""DPO examples: preference records tokenized into chosen and rejected sequences that share a prompt."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .conversations import (
    _check_prompt_format,
    _check_turns,
    _messages_of,
    _solar_segments,
    _template_prompt,
    _template_segments,
)
from .tokens import _encode_one, _leading_bos, _required_token_id, _shifted_labels, _with_bos

logger = logging.getLogger(__name__)


def dpo_examples(
    records, tokenizer, max_length, max_prompt_length, *, prompt_format="solar", source=None
) -> list[dict]:
    """Tokenize preference records into chosen/rejected sequences for DPO.

    A record is ``{"prompt", "chosen", "rejected"}``. ``prompt`` is a string (one user turn) or a list
    of messages ending with a user turn (earlier turns are context, never trained). ``chosen`` and
    ``rejected`` are strings, an assistant message, or a message list holding one assistant message,
    optionally preceded by the prompt's own messages (the "full conversation" layout of
    UltraFeedback-binarized). The prompt is formatted as in ``sft_examples`` and ends with
    ``### Assistant:\\n`` (or the chat template's generation prompt); each response is followed by eos.

    Truncation, only when prompt + the longer response exceed ``max_length`` tokens: first the prompt
    is cut from the LEFT to ``max_prompt_length`` tokens (its end, the question being asked, is kept;
    a leading bos stays), then each response is cut from the RIGHT (its start is kept) so prompt +
    response <= ``max_length``. Both responses keep the same prompt.

    Each example: ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``,
    ``rejected_labels`` (shifted; -100 wherever a prompt token is predicted). A pair whose chosen and
    rejected sequences are identical after tokenization and truncation carries no preference (its
    loss gradient is zero): such pairs are dropped, counted in one warning naming ``source`` (the
    file the records came from, for the message). Raises ``ValueError`` naming the record index and
    field for a malformed record, and when no pair is left.
    """
    caller = "dpo_examples"
    _check_prompt_format(tokenizer, prompt_format, caller)
    if not 0 < max_prompt_length < max_length:
        raise ValueError(
            f"{caller}: max_prompt_length={max_prompt_length}, max_length={max_length}; expected "
            f"0 < max_prompt_length < max_length (the response needs room)"
        )
    eos = _required_token_id(tokenizer, "eos", caller)
    bos = _leading_bos(tokenizer)
    examples, identical, total = [], 0, 0
    for index, record in enumerate(records):
        total += 1
        prompt_messages, responses = _preference_record(record, index, caller)
        if prompt_format == "solar":
            segments = _solar_segments(tokenizer, prompt_messages, generation_prompt=True)
            prompt_ids = [token for ids, _ in segments for token in ids]
            response_ids = [_encode_one(tokenizer, text) + [eos] for text in responses]
        else:
            prompt_ids = _template_prompt(tokenizer, prompt_messages)
            response_ids = []
            for text in responses:
                segments = _template_segments(
                    tokenizer, prompt_messages + [{"role": "assistant", "content": text}], index, caller
                )
                response_ids.append(segments[-1][0])
        prompt_ids, _ = _with_bos(bos, prompt_ids, [False] * len(prompt_ids))

        if len(prompt_ids) + max(map(len, response_ids)) > max_length:
            if len(prompt_ids) > max_prompt_length:
                keep_bos = bos if prompt_ids[:1] == bos else []
                body = prompt_ids[len(keep_bos) :]
                prompt_ids = keep_bos + body[len(body) - (max_prompt_length - len(keep_bos)) :]
            room = max_length - len(prompt_ids)
            response_ids = [ids[:room] for ids in response_ids]

        example = {}
        for name, ids in zip(("chosen", "rejected"), response_ids, strict=True):
            input_ids = prompt_ids + ids
            trained = [False] * len(prompt_ids) + [True] * len(ids)
            example[f"{name}_input_ids"] = input_ids
            example[f"{name}_labels"] = _shifted_labels(input_ids, trained)
        if example["chosen_input_ids"] == example["rejected_input_ids"]:
            identical += 1
            continue
        examples.append(example)
    where = f" in {source}" if source is not None else ""
    if identical and examples:
        logger.warning(
            "%s: dropped %d of %d pairs%s whose chosen and rejected are identical (as text, or after "
            "tokenization and truncation to max_length=%d): they carry no preference",
            caller,
            identical,
            total,
            where,
            max_length,
        )
    if not examples:
        if not total:
            raise ValueError(f"{caller}: no records{where}")
        raise ValueError(
            f"{caller}: no pair left{where}: all {total} pairs have chosen identical to rejected (as text, or "
            f"after tokenization and truncation to max_length={max_length}); expected pairs that differ"
        )
    return examples


def _preference_record(record, index: int, caller: str) -> tuple[list[dict], list[str]]:
    """(prompt messages ending with a user turn, [chosen text, rejected text]) of one record."""
    expected = '{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}'
    if not isinstance(record, Mapping):
        raise ValueError(f"{caller}: record {index} is {type(record).__name__}, expected {expected}")
    for field in ("prompt", "chosen", "rejected"):
        if field not in record:
            raise ValueError(
                f"{caller}: record {index} has no {field!r} field (has {sorted(record)}); expected {expected}"
            )
    prompt = record["prompt"]
    if isinstance(prompt, str):
        prompt_messages = [{"role": "user", "content": prompt}]
    else:
        prompt_messages = _messages_of(prompt, index, "prompt", caller)
        _check_turns(prompt_messages, index, "prompt", caller, last="user")
    responses = []
    for field in ("chosen", "rejected"):
        value = record[field]
        if isinstance(value, str):
            responses.append(value)
            continue
        messages = _messages_of([value] if isinstance(value, Mapping) else value, index, field, caller)
        if messages[: len(prompt_messages)] == prompt_messages:
            messages = messages[len(prompt_messages) :]
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise ValueError(
                f"{caller}: record {index} field {field!r} holds roles {[m['role'] for m in messages]} after "
                f"the prompt, expected exactly one assistant message"
            )
        responses.append(messages[0]["content"])
    return prompt_messages, responses
