"""The data pipeline of the training stages: records -> token rows -> batches.

    records = load_records("corpus.jsonl")                        # datasets.Dataset
    rows = list(pretrain_rows(records, tokenizer, seq_len=2048))  # packed pretraining rows
    examples = sft_examples(records, tokenizer, max_length=2048)  # one conversation per example
    pairs = dpo_examples(records, tokenizer, 2048, 512)           # chosen/rejected per example
    stream = BatchStream(examples, 8, functools.partial(collate_lm, pad_id=tokenizer.pad_token_id), seed=0)

Conventions every function here keeps (the trainer and the model rely on them):

- Labels are already shifted: for input ids ``x[0..T-1]``, ``labels[t]`` is the token position ``t``
  must predict, ``x[t+1]``, or -100 (``IGNORE_INDEX``) where position ``t`` predicts nothing. So
  ``labels[t]`` is always either -100 or ``input_ids[t+1]``, and ``labels[T-1]`` is always -100 (a
  row's last token has no next token in the row, even when truncation cut one off).
- ``position_ids`` restart at 0 at the start of every document packed into a row; the model masks
  attention across documents wherever a position is 0.
- Special token ids come from the tokenizer (``tokenizer.eos_token_id``), never from constants.

Text is tokenized with ``split_special_tokens=True`` wherever it is user text (documents, prompts,
responses): a literal "</s>" in a document is text, not an eos. Only a chat template's own
rendering is parsed for special-token strings, since the template writes them on purpose.

A sequence of an SFT or DPO example starts with bos exactly when the tokenizer adds one by itself
(``tokenizer("x")`` starts with bos: Llama, SOLAR, Mistral) and a chat template has not already
written it, so training sees what ``tokenizer(prompt)`` gives at inference. Pretraining rows carry no
bos: documents are separated by eos and by the position restart.
"""

from __future__ import annotations

import bisect
import codecs
import logging
import os
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from .config import PACKING_STRATEGIES, PROMPT_FORMATS

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Local file suffix -> datasets builder.
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
_TEXT_BUILDERS = ("json", "text")  # builders that decode their files as UTF-8 text
_ROLES = ("system", "user", "assistant")

# docs/method.md#prompt-format, and the chat template shipped with upstage/SOLAR-10.7B-Instruct-v1.0 (which also gives
# the system header). One assistant turn: USER_HEADER + prompt + "\n\n" + ASSISTANT_HEADER + response.
SYSTEM_HEADER = "### System:\n"
USER_HEADER = "### User:\n"
ASSISTANT_HEADER = "### Assistant:\n"


# ----------------------------------------------------------------------------- records


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
        raise ValueError(f"split_records: holding out {fraction} of {n} records leaves "
                         f"{n - held if 0 < fraction < 1 else 'no'} to train on; expected a fraction in (0, 1) "
                         f"that leaves at least one record on each side")
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
            raise ValueError(
                f"load_records: directory {path!r} holds no .json/.jsonl/.parquet/.txt files"
            )
        return files
    if not os.path.isfile(path):
        raise ValueError(f"load_records: no such file or directory: {path!r}")
    if Path(path).suffix.lower() not in _BUILDERS:
        raise ValueError(
            f"load_records: {path!r} has suffix {Path(path).suffix!r}; expected one of {sorted(_BUILDERS)}"
        )
    return [path]


# ----------------------------------------------------------------------------- pretraining


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


def _encode(tokenizer, texts: list[str], *, parse_special=False) -> list[list[int]]:
    """Token ids of each text, no special tokens added; special-token strings stay text unless asked."""
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=not parse_special)
    return [list(ids) for ids in encoded["input_ids"]]


def _encode_one(tokenizer, text: str, *, parse_special=False) -> list[int]:
    return _encode(tokenizer, [text], parse_special=parse_special)[0] if text else []


def _required_token_id(tokenizer, name: str, caller: str) -> int:
    token_id = getattr(tokenizer, f"{name}_token_id")
    if token_id is None:
        raise ValueError(f"{caller}: the tokenizer has no {name} token; set tokenizer.{name}_token")
    return token_id


# ----------------------------------------------------------------------------- conversations


def _leading_bos(tokenizer) -> list[int]:
    """[bos] when the tokenizer adds a bos by itself (Llama-style), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


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
        raise ValueError(
            f"{caller}: record {index} has no {field!r} field (has {sorted(record)}); expected {expected}"
        )
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


def _with_bos(bos: list[int], ids: list[int], trained: list[bool]) -> tuple[list[int], list[bool]]:
    if bos and (not ids or ids[0] != bos[0]):
        return bos + ids, [False] + trained
    return ids, trained


def _shifted_labels(input_ids: list[int], trained: list[bool]) -> list[int]:
    """labels[t] = input_ids[t+1] where token t+1 is trained, else -100; the last label is -100."""
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids[1:], trained[1:])]
    return labels + [IGNORE_INDEX]


def solar_prompt(prompt: str, *, system: str | None = None) -> str:
    """The text a SOLAR-format model is prompted with: what SFT trains it to answer after."""
    head = (SYSTEM_HEADER + system + "\n\n") if system else ""
    return head + USER_HEADER + prompt + "\n\n" + ASSISTANT_HEADER


# ----------------------------------------------------------------------------- SFT


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

    ``prompt_format="solar"`` (docs/method.md#prompt-format): ``### User:\\n{prompt}\\n\\n### Assistant:\\n{response}`` + eos.
    A system message comes first as ``### System:\\n{system}\\n\\n`` (the header upstage's
    SOLAR-Instruct chat template uses); further turns follow the previous answer's eos directly,
    each formatted the same way. ``prompt_format="chat_template"``: the tokenizer's chat template
    renders the conversation; an assistant turn without eos in its rendering gets one appended.
    Prompt and answer pieces are tokenized separately, as at inference (prompt tokenized, answer
    generated).

    Each example: ``input_ids``, ``labels`` (shifted: the tokens of every answer and its eos are
    predicted, everything else is -100; with ``completion_only=False`` every token after the first
    is predicted, prompts included: TRL's ``completion_only_loss=False``), ``position_ids`` (0..n-1). An example longer than
    ``max_length`` is cut from the right (the end of the conversation is lost); one with no answer
    token left is dropped, and the number dropped is logged as a warning. Raises ``ValueError``
    naming the record index for a missing or malformed field, and when no example is left.
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
            caller, dropped, total, max_length,
        )
    if not examples:
        raise ValueError(
            f"{caller}: no example left ({total} records, {dropped} dropped by max_length={max_length})"
        )
    return examples


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
            piece_labels = labels[start:start + take]
            if start + take < len(input_ids):
                piece_labels = piece_labels[:-1] + [IGNORE_INDEX]  # its target went to the next row
            row.append((input_ids[start:start + take], piece_labels))
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
    return {"input_ids": input_ids + [pad_id] * (seq_len - n),
            "labels": labels + [IGNORE_INDEX] * (seq_len - n),
            "position_ids": position_ids + list(range(last + 1, last + 1 + seq_len - n)),
            "attention_mask": [1] * n + [0] * (seq_len - n)}


def packing_efficiency(rows: list[dict]) -> float:
    """Real (non-padding) tokens over the rows' capacity: ``attention_mask`` ones over its length."""
    capacity = sum(len(row["input_ids"]) for row in rows)
    real = sum(sum(row["attention_mask"]) if "attention_mask" in row else len(row["input_ids"]) for row in rows)
    return real / max(capacity, 1)


def _checked_example(example, index: int, caller: str) -> tuple[list[int], list[int]]:
    if not isinstance(example, Mapping) or "input_ids" not in example or "labels" not in example:
        raise ValueError(f"{caller}: example {index} needs 'input_ids' and 'labels'")
    input_ids, labels = list(example["input_ids"]), list(example["labels"])
    if len(input_ids) != len(labels) or not input_ids:
        raise ValueError(
            f"{caller}: example {index} has {len(input_ids)} input_ids and {len(labels)} labels, "
            f"expected the same non-zero number"
        )
    return input_ids, labels


# ----------------------------------------------------------------------------- DPO


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
            caller, identical, total, where, max_length,
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


# ----------------------------------------------------------------------------- batches


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
            raise ValueError(f"collate_lm: example {index} has {len(mask)} attention_mask values for "
                             f"{len(input_ids)} tokens")
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

    def __init__(self, rows: Callable[[], Iterator[dict]], batch_size: int, collate: Callable[[list[dict]], dict],
                 *, rank=0, world_size=1):
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
                yield self.collate(batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])
            if not produced and self.index == 0:
                raise ValueError("StreamingBatches: the stream gave fewer rows than one global batch")
            self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state) -> None:
        epoch, index = state.get("epoch"), state.get("index")
        if not isinstance(epoch, int) or not isinstance(index, int) or epoch < 0 or index < 0:
            raise ValueError(f"StreamingBatches.load_state_dict: got {state!r}, expected {{'epoch': int, 'index': int}}")
        self.epoch, self.index = epoch, index
