"""Packing: examples laid into rows of exactly ``seq_len`` tokens (greedy, best-fit decreasing or wrapped)."""

from __future__ import annotations

import bisect
import logging
from collections import defaultdict, deque

from ..config import PACKING_STRATEGIES
from .tokens import IGNORE_INDEX, _checked_example

logger = logging.getLogger(__name__)


def pack_examples(examples, seq_len, *, pad_id, strategy="greedy") -> list[dict]:
    """Pack examples into rows of exactly ``seq_len`` tokens; ``strategy`` (TRL 1.16's names where
    they exist) says how:

    - ``"greedy"``: in order; an example goes into the current row when it fits, else it starts a
      new row (next fit: a row is closed for good once an example does not fit).
    - ``"bfd"``: best-fit decreasing (TRL's default): the examples longest first (ties in order),
      each into the open row with the least room that holds it, else a new row; rows in the order
      they were opened. Never splits an example; usually fewer rows than ``"greedy"``.
    - ``"wrapped"``: the examples concatenated in order and cut every ``seq_len`` tokens, so rows are
      full but an example cut at a row end continues as a document of its own in the next row (its
      positions restart there and the token before the cut predicts nothing).

    Each example's ``position_ids`` restart at 0, so the model does not attend across examples. The
    tail of a row is padding: ``pad_id`` tokens with labels -100, ``position_ids`` continuing the
    last example's count (as ``collate_lm`` pads: causal attention keeps real tokens from seeing the
    padding), ``attention_mask`` 0 (1 on real tokens). With ``"greedy"`` and ``"bfd"`` an example
    longer than ``seq_len`` is cut to ``seq_len`` from the right (its last label becomes -100); one
    left with no label is dropped (logged). ``packing_efficiency(rows)`` is the share of real tokens.
    """
    if seq_len < 2:
        raise ValueError(f"pack_examples: seq_len={seq_len}, expected at least 2")
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"pack_examples: strategy={strategy!r}, expected one of {', '.join(PACKING_STRATEGIES)}")
    pieces, dropped = [], 0  # (input_ids, labels) of each example, cut to seq_len unless wrapped
    for index, example in enumerate(examples):
        input_ids, labels = _checked_example(example, index, "pack_examples")
        if strategy != "wrapped" and len(input_ids) > seq_len:
            input_ids, labels = input_ids[:seq_len], labels[: seq_len - 1] + [IGNORE_INDEX]
            if all(label == IGNORE_INDEX for label in labels):
                dropped += 1
                continue
        pieces.append((input_ids, labels))
    if dropped:
        logger.warning("pack_examples: dropped %d examples with no label within seq_len=%d", dropped, seq_len)
    if strategy == "wrapped":
        return [_packed_row(row, seq_len, pad_id) for row in _wrapped(pieces, seq_len)]
    lengths = [len(ids) for ids, _ in pieces]
    groups = _best_fit_decreasing(lengths, seq_len) if strategy == "bfd" else _next_fit(lengths, seq_len)
    return [_packed_row([pieces[i] for i in group], seq_len, pad_id) for group in groups]


def _next_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices per row, in order, a new row whenever the next length does not fit the current one."""
    groups: list[list[int]] = []
    room = 0
    for index, length in enumerate(lengths):
        if length > room:
            groups.append([])
            room = capacity
        groups[-1].append(index)
        room -= length
    return groups


def _best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices per row: longest first (a stable sort), each into the row with the least room that
    fits it (the oldest such row on a tie), else a new row; rows in the order they were opened."""
    rooms: list[int] = []  # sorted distinct room sizes of rows that are open and not full
    rows_with_room: dict[int, deque] = defaultdict(deque)
    groups: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        at = bisect.bisect_left(rooms, length)
        if at < len(rooms):
            room = rooms[at]
            group = rows_with_room[room].popleft()
            if not rows_with_room[room]:
                del rooms[at]
        else:
            room, group = capacity, []
            groups.append(group)
        group.append(index)
        left = room - length
        if left > 0:
            if not rows_with_room[left]:
                bisect.insort(rooms, left)
            rows_with_room[left].append(group)
    return groups


def _wrapped(pieces: list[tuple[list[int], list[int]]], seq_len: int):
    """Rows of (input_ids, labels) pieces: the examples end to end, cut every seq_len tokens; the
    label of a piece's last token is -100 where the cut separated it from the token it predicts."""
    row, used = [], 0
    for input_ids, labels in pieces:
        start = 0
        while start < len(input_ids):
            take = min(seq_len - used, len(input_ids) - start)
            piece_labels = labels[start : start + take]
            if start + take < len(input_ids):
                piece_labels = piece_labels[:-1] + [IGNORE_INDEX]  # its target went to the next row
            row.append((input_ids[start : start + take], piece_labels))
            start, used = start + take, used + take
            if used == seq_len:
                yield row
                row, used = [], 0
    if row:
        yield row


def _packed_row(pieces: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> dict:
    """One row of ``seq_len`` tokens from (input_ids, labels) pieces, positions restarting per piece."""
    input_ids = [token for ids, _ in pieces for token in ids]
    labels = [label for _, labs in pieces for label in labs]
    position_ids = [position for ids, _ in pieces for position in range(len(ids))]
    n, last = len(input_ids), position_ids[-1]
    return {
        "input_ids": input_ids + [pad_id] * (seq_len - n),
        "labels": labels + [IGNORE_INDEX] * (seq_len - n),
        "position_ids": position_ids + list(range(last + 1, last + 1 + seq_len - n)),
        "attention_mask": [1] * n + [0] * (seq_len - n),
    }


def packing_efficiency(rows: list[dict]) -> float:
    """Real (non-padding) tokens over the rows' capacity: ``attention_mask`` ones over its length."""
    capacity = sum(len(row["input_ids"]) for row in rows)
    real = sum(sum(row["attention_mask"]) if "attention_mask" in row else len(row["input_ids"]) for row in rows)
    return real / max(capacity, 1)
