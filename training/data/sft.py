"""SFT examples: instruction-tuning records tokenized so that the answers are trained on."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .conversations import (
    _check_prompt_format,
    _check_turns,
    _messages_of,
    _solar_segments,
    _string_field,
    _template_segments,
)
from .tokens import IGNORE_INDEX, _leading_bos, _required_token_id, _shifted_labels, _with_bos

logger = logging.getLogger(__name__)


def sft_examples(
    records,
    tokenizer,
    max_length,
    *,
    prompt_format="solar",
    prompt_field="prompt",
    response_field="response",
    messages_field="messages",
    completion_only=True,
) -> list[dict]:
    """Tokenize instruction-tuning records into examples that train on the answers (or everything).

    A record is ``{prompt_field: str, response_field: str}`` or ``{messages_field: [{"role":
    "system"|"user"|"assistant", "content": str}, ...]}``: an optional system message, then user and
    assistant turns alternating and ending with assistant. Every assistant turn is trained on.

    ``prompt_format="solar"`` (docs/method.md#prompt-format):
    ``### User:\\n{prompt}\\n\\n### Assistant:\\n{response}`` + eos.
    A system message comes first as ``### System:\\n{system}\\n\\n`` (the header upstage's
    SOLAR-Instruct chat template uses); further turns follow the previous answer's eos directly,
    each formatted the same way. ``prompt_format="chat_template"``: the tokenizer's chat template
    renders the conversation; an assistant turn without eos in its rendering gets one appended.
    Prompt and answer pieces are tokenized separately, as at inference (prompt tokenized, answer
    generated).

    Each example: ``input_ids``, ``labels`` (shifted: the tokens of every answer and its eos are
    predicted, everything else is -100; with ``completion_only=False`` every token after the first
    is predicted, prompts included: TRL's ``completion_only_loss=False``), ``position_ids`` (0..n-1).
    An example longer than ``max_length`` is cut from the right (the end of the conversation is
    lost); one with no answer token left is dropped, and the number dropped is logged as a warning.
    Raises ``ValueError`` naming the record index for a missing or malformed field, and when no
    example is left.
    """
    caller = "sft_examples"
    _check_prompt_format(tokenizer, prompt_format, caller)
    if max_length < 2:
        raise ValueError(f"{caller}: max_length={max_length}, expected at least 2")
    _required_token_id(tokenizer, "eos", caller)
    bos = _leading_bos(tokenizer)
    expected = (
        f'{{"{prompt_field}": str, "{response_field}": str}} or '
        f'{{"{messages_field}": [{{"role": ..., "content": ...}}, ...]}}'
    )
    examples, dropped, total = [], 0, 0
    for index, record in enumerate(records):
        total += 1
        if not isinstance(record, Mapping):
            raise ValueError(f"{caller}: record {index} is {type(record).__name__}, expected {expected}")
        if record.get(messages_field) is not None:
            messages = _messages_of(record[messages_field], index, messages_field, caller)
            _check_turns(messages, index, messages_field, caller, last="assistant")
        else:
            if prompt_field not in record and response_field not in record:
                raise ValueError(f"{caller}: record {index} has fields {sorted(record)}, expected {expected}")
            prompt = _string_field(record, index, prompt_field, caller, expected)
            response = _string_field(record, index, response_field, caller, expected)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if prompt_format == "solar":
            segments = _solar_segments(tokenizer, messages, generation_prompt=False)
        else:
            segments = _template_segments(tokenizer, messages, index, caller)
        input_ids = [token for ids, _ in segments for token in ids]
        trained = [keep or not completion_only for ids, keep in segments for _ in ids]
        input_ids, trained = _with_bos(bos, input_ids, trained)
        input_ids, trained = input_ids[:max_length], trained[:max_length]
        labels = _shifted_labels(input_ids, trained)
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        examples.append({"input_ids": input_ids, "labels": labels, "position_ids": list(range(len(input_ids)))})
    if dropped:
        logger.warning(
            "%s: dropped %d of %d examples with no answer token within max_length=%d",
            caller,
            dropped,
            total,
            max_length,
        )
    if not examples:
        raise ValueError(f"{caller}: no example left ({total} records, {dropped} dropped by max_length={max_length})")
    return examples
