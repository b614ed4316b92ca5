"""Batches: examples collated into padded tensors, and the resumable streams of batches the trainer reads."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from .tokens import IGNORE_INDEX, _checked_example


def collate_lm(examples, pad_id) -> dict[str, torch.Tensor]:
    """Right-pad examples into ``input_ids``, ``labels``, ``position_ids``, ``attention_mask``: [B, T]
    long, T the longest.

    Padding: ``pad_id`` tokens, labels -100, position_ids counting on from the example's last
    position (an example without ``position_ids`` gets 0..n-1), attention_mask 0. The mask is 1 on
    an example's own tokens, or its ``attention_mask`` where it has one (a packed row's padding).
    The model does not read it (rows are causal and right-padded); the trainer counts real tokens.
    """
    if not examples:
        raise ValueError("collate_lm: got no examples")
    rows = []
    for index, example in enumerate(examples):
        input_ids, labels = _checked_example(example, index, "collate_lm")
        positions = list(example["position_ids"]) if "position_ids" in example else list(range(len(input_ids)))
        if len(positions) != len(input_ids):
            raise ValueError(
                f"collate_lm: example {index} has {len(positions)} position_ids for {len(input_ids)} tokens"
            )
        mask = list(example["attention_mask"]) if "attention_mask" in example else [1] * len(input_ids)
        if len(mask) != len(input_ids):
            raise ValueError(
                f"collate_lm: example {index} has {len(mask)} attention_mask values for {len(input_ids)} tokens"
            )
        rows.append((input_ids, labels, positions, mask))
    return _padded(rows, pad_id)


def collate_dpo(examples, pad_id) -> dict[str, torch.Tensor]:
    """Stack B preference examples into [2B, T] ``input_ids``, ``labels``, ``position_ids``.

    Rows 0..B-1 are the chosen sequences, rows B..2B-1 the rejected ones in the same order (row i
    and row B+i are one pair); one T (the longest of all 2B) so policy and reference run one batch.
    Padding as in ``collate_lm``; position_ids are 0..T-1, attention_mask 1 on each sequence's tokens.
    """
    if not examples:
        raise ValueError("collate_dpo: got no examples")
    rows = []
    for name in ("chosen", "rejected"):
        for index, example in enumerate(examples):
            keys = (f"{name}_input_ids", f"{name}_labels")
            if not isinstance(example, Mapping) or any(key not in example for key in keys):
                raise ValueError(f"collate_dpo: example {index} needs {keys}")
            input_ids, labels = list(example[keys[0]]), list(example[keys[1]])
            if len(input_ids) != len(labels) or not input_ids:
                raise ValueError(
                    f"collate_dpo: example {index} {name} has {len(input_ids)} input_ids and {len(labels)} labels"
                )
            rows.append((input_ids, labels, list(range(len(input_ids))), [1] * len(input_ids)))
    return _padded(rows, pad_id)


def _padded(rows: list[tuple[list[int], list[int], list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(row[0]) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.empty((len(rows), length), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, (ids, labs, positions, mask) in enumerate(rows):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids, dtype=torch.long)
        labels[r, :n] = torch.tensor(labs, dtype=torch.long)
        position_ids[r, :n] = torch.tensor(positions, dtype=torch.long)
        position_ids[r, n:] = torch.arange(positions[-1] + 1, positions[-1] + 1 + length - n)
        attention_mask[r, :n] = torch.tensor(mask, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention_mask}


def num_tokens(batch) -> int:
    """The labeled (non-padding, non-prompt) tokens of a batch: ``labels != -100``."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


class BatchStream:
    """Batches of ``examples`` forever, epoch after epoch, resumable at any batch.

    Epoch ``e`` visits the examples in the order ``torch.randperm`` gives with seed ``seed + e``
    (or in their order when ``shuffle=False``), cut into global batches of ``batch_size *
    world_size`` examples. Rank ``r`` takes the r-th slice of ``batch_size`` of each global batch, so
    ``world_size`` processes with batch ``b`` together see exactly the examples, in the same order,
    that one process with batch ``world_size * b`` sees (the trainer's distributed test relies on
    this), and every rank stays in step. ``drop_last``: an epoch ends with the last full global
    batch; otherwise the last global batch is completed with the epoch's first examples (as torch's
    DistributedSampler does), so every batch of every rank has ``batch_size`` examples.

    ``state_dict()`` is ``{"epoch", "index"}``: where the next batch comes from (batch ``index`` of
    epoch ``epoch``); it is global, the same on every rank. ``load_state_dict`` resumes there; the
    batches that follow are identical to the ones an uninterrupted stream gives.
    ``collate`` turns a list of examples into a batch, e.g. ``partial(collate_lm, pad_id=...)``.
    """

    def __init__(
        self,
        examples: list[dict],
        batch_size: int,
        collate: Callable[[list[dict]], dict],
        *,
        seed: int,
        shuffle=True,
        rank=0,
        world_size=1,
        drop_last=True,
    ):
        if len(examples) == 0:
            raise ValueError("BatchStream: got no examples")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"BatchStream: batch_size={batch_size}, rank={rank}, world_size={world_size}; expected "
                f"batch_size >= 1 and 0 <= rank < world_size"
            )
        global_batch = batch_size * world_size
        if drop_last and len(examples) < global_batch:
            raise ValueError(
                f"BatchStream: {len(examples)} examples cannot fill one global batch of {global_batch} "
                f"(batch_size {batch_size} x world_size {world_size}) with drop_last=True"
            )
        self.examples = examples
        self.batch_size, self.collate = batch_size, collate
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        n = len(examples)
        self.batches_per_epoch = n // global_batch if drop_last else -(-n // global_batch)
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = None, None

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            n = len(self.examples)
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(n, generator=generator).tolist()
            else:
                self._order = list(range(n))
            self._order_epoch = epoch
        return self._order

    def _batch_indices(self, epoch: int, index: int) -> list[int]:
        order = self._epoch_order(epoch)
        global_batch = self.batch_size * self.world_size
        chosen = order[index * global_batch : (index + 1) * global_batch]
        while len(chosen) < global_batch:  # the last batch without drop_last; wraps (n may be < global_batch)
            chosen += order[: global_batch - len(chosen)]
        return chosen[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self):
        while True:
            indices = self._batch_indices(self.epoch, self.index)
            # Advance before yielding: state_dict() taken after receiving a batch names the next one.
            self.index += 1
            if self.index == self.batches_per_epoch:
                self.epoch, self.index = self.epoch + 1, 0
            yield self.collate([self.examples[i] for i in indices])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state) -> None:
        epoch, index = state.get("epoch"), state.get("index")
        valid = isinstance(epoch, int) and isinstance(index, int) and epoch >= 0
        if not valid or not 0 <= index < self.batches_per_epoch:
            raise ValueError(
                f"BatchStream.load_state_dict: got {state!r}, expected {{'epoch': int >= 0, 'index': int in "
                f"[0, {self.batches_per_epoch})}} (a state of a stream over other examples or batch sizes?)"
            )
        self.epoch, self.index = epoch, index


class StreamingBatches:
    """Batches of rows produced on the fly (``rows()`` makes a fresh iterator), for datasets too
    large to hold: a streamed ``datasets.IterableDataset`` through ``pretrain_rows``, say.

    Rows are taken in their stream order (no shuffle beyond what the source does), cut into global
    batches of ``batch_size * world_size`` rows; rank ``r`` takes the r-th slice, as in
    ``BatchStream``. When the stream runs out a new pass starts (the epoch counter goes up).
    ``state_dict()`` is ``{"epoch", "index"}`` (global batches consumed in the current pass);
    ``load_state_dict`` resumes by re-reading the stream and skipping that many global batches:
    exact, and it costs one pass over the skipped rows (tokenization included) at resume.
    """

    def __init__(
        self,
        rows: Callable[[], Iterator[dict]],
        batch_size: int,
        collate: Callable[[list[dict]], dict],
        *,
        rank=0,
        world_size=1,
    ):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"StreamingBatches: batch_size={batch_size}, rank={rank}, world_size={world_size}; expected "
                f"batch_size >= 1 and 0 <= rank < world_size"
            )
        self.rows, self.batch_size, self.collate = rows, batch_size, collate
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0

    def _global_batches(self):
        global_batch = self.batch_size * self.world_size
        pending: list[dict] = []
        for row in self.rows():
            pending.append(row)
            if len(pending) == global_batch:
                yield pending
                pending = []

    def __iter__(self):
        while True:
            produced = False
            for number, batch in enumerate(self._global_batches()):
                if number < self.index:  # resuming: skip what was consumed before
                    continue
                produced = True
                self.index = number + 1
                yield self.collate(batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])
            if not produced and self.index == 0:
                raise ValueError("StreamingBatches: the stream gave fewer rows than one global batch")
            self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state) -> None:
        epoch, index = state.get("epoch"), state.get("index")
        if not isinstance(epoch, int) or not isinstance(index, int) or epoch < 0 or index < 0:
            raise ValueError(
                f"StreamingBatches.load_state_dict: got {state!r}, expected {{'epoch': int, 'index': int}}"
            )
        self.epoch, self.index = epoch, index
