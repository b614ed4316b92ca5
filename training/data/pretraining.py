"""Pretraining rows: documents tokenized, joined by eos and cut into rows of exactly ``seq_len`` tokens;
held-out rows: each document in windows of its own, the ones ``solar eval`` scores."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from solar_kernels.evaluate import token_windows

from .tokens import IGNORE_INDEX, _encode, _required_token_id


def pretrain_rows(records, tokenizer, seq_len, *, text_field="text") -> Iterator[dict]:
    """Pack documents into rows of exactly ``seq_len`` tokens for continued pretraining.

    Each document is tokenized (no bos), followed by eos, and appended to one token stream that is
    cut into consecutive rows; the final partial row is dropped. Documents that are empty or only
    whitespace are skipped (blank lines of a .txt file). Each row (lists of ints, length ``seq_len``):

    - ``input_ids``: the stream's tokens.
    - ``labels``: ``input_ids[t+1]``, except -100 at ``t = seq_len-1`` and wherever
      ``input_ids[t]`` is a document's closing eos (it would predict the next document's first token).
      A document's last text token does predict its eos: the model learns where documents end.
    - ``position_ids``: 0 at the row start and after every eos, counting up in between. A document
      cut by a row boundary starts over at 0 in the next row: rows are independent sequences, and its
      continuation is treated as a document of its own (one context lost per row, as in every
      packed-pretraining pipeline).

    Yields rows lazily, so a streaming dataset is never materialized. Raises ``ValueError`` naming
    the record index when a record lacks ``text_field`` or its value is not a string.
    """
    if seq_len < 2:
        raise ValueError(f"pretrain_rows: seq_len={seq_len}, expected at least 2")
    eos = _required_token_id(tokenizer, "eos", "pretrain_rows")
    stream: list[int] = []
    start = 0  # stream[start:] is not yet emitted
    for document in _tokenized_documents(records, tokenizer, text_field):
        stream.extend(document)
        stream.append(eos)
        while len(stream) - start >= seq_len:
            yield _pretrain_row(stream[start : start + seq_len], eos)
            start += seq_len
        if start > 1 << 16:  # drop the emitted prefix now and then, not per row (quadratic)
            del stream[:start]
            start = 0


def held_out_rows(records, tokenizer, seq_len, *, text_field="text") -> list[dict]:
    """The held-out rows of continued pretraining: the windows ``solar eval`` scores
    (``solar_kernels.evaluate.token_windows``), so the trainer's held-out loss is its loss (up to
    autocast). Each document, followed by eos, is cut on its own into windows of ``seq_len`` tokens,
    its last one shorter (dropped under 2 tokens); ``labels`` and ``position_ids`` as in
    ``pretrain_rows``. Packed rows (``pretrain_rows``) would score other tokens: they drop the
    stream's final partial row, and a document cut by a row boundary loses its context there."""
    eos = _required_token_id(tokenizer, "eos", "held_out_rows")
    if seq_len < 2:
        raise ValueError(f"held_out_rows: seq_len={seq_len}, expected at least 2")
    windows = token_windows(_tokenized_documents(records, tokenizer, text_field), seq_len, eos)
    return [{"input_ids": w, "labels": w[1:] + [IGNORE_INDEX], "position_ids": list(range(len(w)))} for w in windows]


def _pretrain_row(input_ids: list[int], eos: int) -> dict:
    labels = input_ids[1:] + [IGNORE_INDEX]
    position_ids = []
    position = 0
    for t, token in enumerate(input_ids):
        position_ids.append(position)
        if token == eos:
            labels[t] = IGNORE_INDEX
            position = 0
        else:
            position += 1
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def _tokenized_documents(records, tokenizer, text_field, batch_size=256) -> Iterator[list[int]]:
    """Token ids of each non-blank document, tokenized in batches (the fast tokenizer's batch path)."""
    batch: list[str] = []
    for index, record in enumerate(records):
        if not isinstance(record, Mapping) or text_field not in record:
            fields = sorted(record) if isinstance(record, Mapping) else type(record).__name__
            raise ValueError(
                f"pretrain_rows: record {index} has no field {text_field!r} (it has {fields}); "
                f"set text_field to the field holding the document text"
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(
                f"pretrain_rows: record {index} field {text_field!r} is {type(text).__name__}, expected str"
            )
        if text.strip():
            batch.append(text)
        if len(batch) == batch_size:
            yield from _encode(tokenizer, batch)
            batch = []
    if batch:
        yield from _encode(tokenizer, batch)
