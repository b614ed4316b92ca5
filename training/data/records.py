"""Records: loading local files or a hub dataset (``load_records``) and holding some out (``split_records``)."""

from __future__ import annotations

import codecs
import os
from pathlib import Path

import torch

# Local file suffix -> datasets builder.
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
_TEXT_BUILDERS = ("json", "text")  # builders that decode their files as UTF-8 text


def load_records(source, *, split="train", streaming=False, text_field=None):
    """Load records from local files or a Hugging Face hub dataset name.

    ``source`` is a file, a list of files, or a directory (every .json/.jsonl/.parquet/.txt file
    under it, recursively, in sorted order); .json/.jsonl load with the "json" builder, .parquet with
    "parquet", .txt with "text" (one record ``{"text": line}`` per line). Local files all go into
    ``split``. Anything else is taken as a hub dataset name for ``datasets.load_dataset``, which needs
    network access or a copy in the local cache.

    ``text_field``, when given, must be a column of the result (checked here, so a wrong field name
    fails before any tokenization). Returns a ``datasets.Dataset``, or a ``datasets.IterableDataset``
    when ``streaming``. Raises ``ValueError`` for a missing file, files of mixed kinds, a dataset
    that cannot be loaded, an empty dataset, or a missing ``text_field``; and for a local
    .json/.jsonl/.txt file that is not UTF-8, naming the file, the line and the byte offset (each
    such file is scanned once before loading: the json builder would store the bad bytes in its
    Arrow cache unchecked, to fail when the row is read).
    """
    import datasets  # the training extra; imported here so the module imports without it

    files = _local_files(source)
    if files is None:
        try:
            records = datasets.load_dataset(source, split=split, streaming=streaming)
        except Exception as error:  # noqa: BLE001 - datasets raises many kinds; all mean "not loadable"
            raise ValueError(
                f"load_records: could not load {source!r} as a Hugging Face hub dataset "
                f"({type(error).__name__}: {error}). Hub names need network access or a copy in the "
                f"local cache; for local data give a .json/.jsonl/.parquet/.txt file or a directory"
            ) from error
        described = f"hub dataset {source!r}"
    else:
        kinds = {_BUILDERS[Path(f).suffix.lower()] for f in files}
        if len(kinds) > 1:
            raise ValueError(
                f"load_records: {source!r} mixes file kinds {sorted(kinds)}; expected files of one kind "
                f"(json/jsonl, parquet or txt)"
            )
        described = f"{files[0]!r}" if len(files) == 1 else f"{len(files)} files under {source!r}"
        if all(os.path.getsize(f) == 0 for f in files):
            raise ValueError(f"load_records: {described} is empty")
        kind = kinds.pop()
        if kind in _TEXT_BUILDERS:
            # The json builder stores bytes that are not UTF-8 in its Arrow cache unchecked (they fail
            # when a row is read, mid-run) and a stream reads lazily; neither error names the file.
            _check_utf8(files)
        try:
            records = datasets.load_dataset(kind, data_files={split: files}, split=split, streaming=streaming)
        except Exception as error:  # noqa: BLE001 - a file with no records raises ValueError or worse
            raise ValueError(
                f"load_records: could not load {described} ({type(error).__name__}: {error}); is it empty "
                f"or not valid {Path(files[0]).suffix} data?"
            ) from error

    if streaming:
        first = next(iter(records), None)
        if first is None:
            raise ValueError(f"load_records: {described} is empty (split {split!r})")
        columns = list(first)
    else:
        if len(records) == 0:
            raise ValueError(f"load_records: {described} is empty (split {split!r})")
        columns = records.column_names
    if text_field is not None and text_field not in columns:
        raise ValueError(f"load_records: {described} has no field {text_field!r}; its fields are {columns}")
    return records


def split_records(records, fraction: float, seed: int):
    """(train, held out): ``round(fraction * n)`` of the ``n`` records (at least 1) held out.

    The held-out indices are the first ones of ``torch.randperm(n)`` under ``seed``; both parts keep
    the records' order. ``records`` is a ``datasets.Dataset`` (split with ``select``) or a list.
    Raises ``ValueError`` when the split would leave either part empty.
    """
    n = len(records)
    held = max(1, round(fraction * n))
    if not 0 < fraction < 1 or held >= n:
        raise ValueError(
            f"split_records: holding out {fraction} of {n} records leaves "
            f"{n - held if 0 < fraction < 1 else 'no'} to train on; expected a fraction in (0, 1) "
            f"that leaves at least one record on each side"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:held])
    train = [i for i in range(n) if i not in held_out]
    evaluation = sorted(held_out)
    if hasattr(records, "select"):
        return records.select(train), records.select(evaluation)
    return [records[i] for i in train], [records[i] for i in evaluation]


def _check_utf8(files: list[str]) -> None:
    """A ``ValueError`` naming the file, line and byte offset of the first byte that is not UTF-8.

    Reads each file once, in 1 MiB chunks (ASCII chunks are only scanned, not decoded).
    """
    for path in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset, line = 0, 1  # of the first byte of the next chunk
        with open(path, "rb") as handle:
            while True:
                chunk = handle.read(1 << 20)
                try:
                    if not chunk.isascii() or decoder.getstate()[0]:  # plain ASCII needs no decoding
                        decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as error:
                    data = error.object  # the bytes held back from the previous chunk, then this chunk
                    position = offset - (len(data) - len(chunk)) + error.start
                    line += data.count(b"\n", 0, error.start)
                    raise ValueError(
                        f"load_records: {path} is not UTF-8 text: byte 0x{data[error.start]:02x} at byte offset "
                        f"{position} (line {line}); expected UTF-8 {Path(path).suffix} data"
                    ) from error
                if not chunk:
                    break
                offset += len(chunk)
                line += chunk.count(b"\n")


def _local_files(source) -> list[str] | None:
    """The local files ``source`` names, or None when it is a hub dataset name."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("load_records: got an empty list of files")
        files = []
        for item in source:
            files.extend(_local_files_of_path(os.fspath(item)))
        return files
    path = os.fspath(source)
    # A hub name is "name" or "org/name": no known suffix, not relative or absolute-looking.
    looks_local = (
        isinstance(source, os.PathLike)
        or os.path.exists(path)
        or Path(path).suffix.lower() in _BUILDERS
        or path.startswith((".", "/", "~"))
        or path.count("/") > 1
    )
    return _local_files_of_path(path) if looks_local else None


def _local_files_of_path(path: str) -> list[str]:
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS)
        if not files:
            raise ValueError(f"load_records: directory {path!r} holds no .json/.jsonl/.parquet/.txt files")
        return files
    if not os.path.isfile(path):
        raise ValueError(f"load_records: no such file or directory: {path!r}")
    if Path(path).suffix.lower() not in _BUILDERS:
        raise ValueError(
            f"load_records: {path!r} has suffix {Path(path).suffix!r}; expected one of {sorted(_BUILDERS)}"
        )
    return [path]
