"""``solar eval``: held-out loss and perplexity on a text dataset, preference accuracy on pairs.

Loss. Every document (a ``.txt`` file is one document; a ``.jsonl``/``.json``/``.parquet`` row is one,
its ``--text-field``) is tokenized without special tokens and followed by the tokenizer's eos, as
in continued pretraining; each document is split on its own into non-overlapping windows of
``--seq-len`` tokens, its last one shorter (dropped when under 2 tokens), so no window holds two
documents (``--max-tokens`` caps the tokens taken, the documents' in order). Each window is an
independent sequence (positions from 0): its token t >= 1 is scored given tokens 0..t-1 of the same
window; its first token is context only, as in a plain LM loss. The trainer's held-out loss in
continued pretraining scores the same windows (``training/data/pretraining.py::held_out_rows``).
The loss is the token-weighted mean negative log-likelihood over all scored tokens (nats), computed by the fused ``linear_cross_entropy`` on the model's final hidden
states (the logits are never materialized), and the perplexity is ``exp(loss)``.

Preference accuracy. Each line of a ``--pairs`` file is ``{"prompt", "chosen", "rejected"}``
(strings). The prompt is tokenized as the tokenizer does by default (its bos, when it adds one),
or with ``--chat`` as one user turn under the chat template with the assistant's generation prompt;
each completion is tokenized without special tokens and appended to it (no eos). Its score is the
summed log-probability of the completion tokens given the prompt (``sequence_logprobs``). The
accuracy is the share of pairs whose chosen score is strictly greater than the rejected one (a tie
counts as wrong); the reward margin is the mean of chosen minus rejected score (nats; no reference
model, so it is the DPO reward margin with beta = 1 against a uniform reference).

``continuation_logprobs`` is the scoring shared with the lm-evaluation-harness adapter
(``solar_kernels.lm_eval_adapter``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from .checkpoint import CheckpointError, CheckpointReader, follow_umask

logger = logging.getLogger(__name__)

# Which datasets builder reads each local file type.
TEXT_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------ inputs


def text_files(path: str | Path) -> tuple[str, list[Path]]:
    """(datasets builder name, files) of a text file or of a folder's files (recursively, sorted)."""
    path = Path(path)
    expected = f"a {'/'.join(TEXT_FORMATS)} file or a folder of them"
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_FORMATS)
        if not files:
            raise ValueError(f"--text {path}: the folder holds no {'/'.join(TEXT_FORMATS)} file; expected {expected}")
    else:
        raise ValueError(f"--text {path}: no such file or folder; expected {expected}")
    builders = sorted({TEXT_FORMATS.get(p.suffix.lower(), "?") for p in files})
    if "?" in builders:
        raise ValueError(f"--text {path}: unsupported file type {files[0].suffix!r}; expected {expected}")
    if len(builders) > 1:
        raise ValueError(f"--text {path}: mixes {' and '.join(builders)} files; expected files of one kind")
    return builders[0], files


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """The documents of a local text dataset, read with ``datasets.load_dataset`` (local files only)."""
    builder, files = text_files(path)
    try:
        import datasets
    except ImportError as error:
        raise ValueError(f"reading --text needs the datasets package (pip install datasets): {error}") from None
    options = {"sample_by": "document"} if builder == "text" else {}
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # its "Generating train split" bars would garble one-line errors
    try:
        table = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **options)
    except Exception as error:  # datasets and pyarrow raise many types for a malformed file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"--text {path}: not a readable {builder} dataset ({type(error).__name__}: {first_line})"
        ) from None
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    field = "text" if builder == "text" else text_field
    if field not in table.column_names:
        raise ValueError(
            f"--text {path}: no field {field!r} (the rows have {table.column_names}); "
            f"set --text-field to the field holding the document text"
        )
    texts = table[field]
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"--text {path}: row {index} field {field!r} is {type(text).__name__}, expected str")
    return [text for text in texts if text.strip()]


def read_pairs(path: str | Path) -> list[dict[str, str]]:
    """The records of a preference jsonl file: one ``{"prompt", "chosen", "rejected"}`` object per line."""
    path = Path(path)
    expected = '{"prompt": str, "chosen": str, "rejected": str}'
    if not path.is_file():
        raise ValueError(f"--pairs {path}: no such file; expected a jsonl file of {expected}")
    pairs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"--pairs {path}: not UTF-8 text ({error})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"--pairs {path}: line {number} is not JSON ({error}); expected {expected}") from None
        if not isinstance(record, dict) or not all(
            isinstance(record.get(k), str) for k in ("prompt", "chosen", "rejected")
        ):
            given = (
                {k: type(v).__name__ for k, v in record.items()} if isinstance(record, dict) else type(record).__name__
            )
            raise ValueError(f"--pairs {path}: line {number} is {given}, expected {expected}")
        pairs.append({k: record[k] for k in ("prompt", "chosen", "rejected")})
    if not pairs:
        raise ValueError(f"--pairs {path}: no pairs; expected one {expected} per line")
    return pairs


def encoded_documents(tokenizer, texts: Sequence[str], batch_size: int = 256) -> Iterator[list[int]]:
    """Token ids of each text that is not blank, as continued pretraining tokenizes documents (no
    special tokens added; a special token's string in the text stays text), tokenized lazily in
    batches: a ``--max-tokens`` cut stops the tokenizing too."""
    texts = [text for text in texts if text.strip()]
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            list(texts[start : start + batch_size]), add_special_tokens=False, split_special_tokens=True
        )
        yield from (list(ids) for ids in encoded.input_ids)


def token_windows(
    documents: Iterable[list[int]], seq_len: int, eos_id: int | None, max_tokens: int | None = None
) -> list[list[int]]:
    """Each document (followed by ``eos_id`` when there is one) in non-overlapping windows of
    ``seq_len`` tokens, its last window shorter: no window spans two documents, so none reads
    another document as context or predicts a document's first token from the one before. At most
    ``max_tokens`` tokens are taken (the documents' in order, the last one cut); a window under 2
    tokens scores nothing and is dropped."""
    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2 (one context token and one scored token), got {seq_len}")
    windows: list[list[int]] = []
    taken = 0
    for document in documents:
        tokens = list(document) + ([eos_id] if eos_id is not None else [])
        if max_tokens is not None:
            tokens = tokens[: max_tokens - taken]
        taken += len(tokens)
        windows += [tokens[start : start + seq_len] for start in range(0, len(tokens), seq_len)]
        if max_tokens is not None and taken >= max_tokens:
            break
    return [window for window in windows if len(window) >= 2]


# ---------------------------------------------------------------------------------------- scoring


def _batches(order: Sequence[int], batch_size: int) -> Iterable[list[int]]:
    for start in range(0, len(order), batch_size):
        yield list(order[start : start + batch_size])


def _shifted_batch(rows: Sequence[list[int]], scored: Sequence[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, T-1], targets [B, T-1]) for token rows right-padded to T: position t of a row reads
    its tokens 0..t and predicts token t+1, which is its target when it is among the row's last
    ``scored`` tokens, else -100. A causal model's real tokens never see the padding."""
    ids = torch.zeros((len(rows), max(map(len, rows))), dtype=torch.long, device=device)  # [B, T]
    targets = torch.full_like(ids, IGNORE_INDEX)
    for row, (tokens, count) in enumerate(zip(rows, scored)):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=device)
        targets[row, len(tokens) - count : len(tokens)] = ids[row, len(tokens) - count : len(tokens)]
    return ids[:, :-1], targets[:, 1:]


@torch.no_grad()
def heldout_nll(model, windows: Sequence[list[int]], *, batch_size: int = 4) -> tuple[float, int]:
    """(summed negative log-likelihood, scored tokens) of the windows: every token after the first of
    each window, given the window's earlier tokens; fused linear cross-entropy on the hidden states."""
    from .ops import linear_cross_entropy

    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))  # equal lengths share a batch
    for batch in _batches(order, batch_size):
        rows = [windows[i] for i in batch]
        inputs, targets = _shifted_batch(rows, [len(tokens) - 1 for tokens in rows], device)
        hidden = model(inputs, return_hidden=True)  # [B, T-1, d]
        nll = linear_cross_entropy(hidden, model.lm_head.weight, targets, reduction="sum", backend=model.config.backend)
        total += float(nll)
        count += int((targets != IGNORE_INDEX).sum())
    return total, count


@torch.no_grad()
def continuation_logprobs(
    model,
    requests: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 4,
    max_length: int | None = None,
    greedy: bool = False,
) -> list[tuple[float, bool]]:
    """(summed log-prob of ``continuation`` given ``context``, whether greedy decoding produces it)
    per ``(context ids, continuation ids)`` request, through ``sequence_logprobs``.

    The model reads at most ``max_length`` tokens (default: its ``max_position_embeddings``): a
    longer context + continuation keeps its last ``max_length + 1`` tokens (the last one is only
    predicted); continuation tokens that then fall at position 0 have no context and are not scored.
    ``greedy=False`` skips the argmax over the vocabulary and reports False.
    """
    from .ops import sequence_logprobs

    if max_length is None:
        max_length = model.config.max_position_embeddings
    device = next(model.parameters()).device
    rows, scored = [], []
    for index, (context, continuation) in enumerate(requests):
        if not continuation:
            raise ValueError(f"request {index}: the continuation is empty after tokenization; expected >= 1 token")
        if not context:
            raise ValueError(f"request {index}: the context is empty; expected >= 1 token (a bos or eos prefix)")
        full = (list(context) + list(continuation))[-(max_length + 1) :]
        rows.append(full)
        scored.append(min(len(continuation), len(full) - 1))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for batch in _batches(order, batch_size):
        inputs, targets = _shifted_batch([rows[i] for i in batch], [scored[i] for i in batch], device)
        hidden = model(inputs, return_hidden=True)  # [B, T-1, d]
        logprobs = sequence_logprobs(hidden, model.lm_head.weight, targets, backend=model.config.backend)  # [B]
        matches = torch.zeros(len(batch), dtype=torch.bool, device=device)
        if greedy:
            valid = targets != IGNORE_INDEX  # [B, T-1]
            misses = torch.zeros_like(targets)
            misses[valid] = (model.lm_head(hidden[valid]).argmax(-1) != targets[valid]).long()  # [N] scored rows
            matches = misses.sum(-1) == 0
        for row, i in enumerate(batch):
            results[i] = (float(logprobs[row]), bool(matches[row]))
    return results


def prompt_ids(tokenizer, prompt: str, *, chat: bool = False) -> list[int]:
    """A pair's prompt: one user turn under the chat template (``chat``) or the tokenizer's default ids."""
    if chat:
        from .chat import chat_prompt

        return chat_prompt(tokenizer, [{"role": "user", "content": prompt}])
    return list(tokenizer(prompt).input_ids)


def preference_requests(
    tokenizer, pairs: Sequence[dict[str, str]], *, chat: bool = False
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) for each pair's chosen then rejected completion, interleaved."""
    requests = []
    for index, pair in enumerate(pairs):
        context = prompt_ids(tokenizer, pair["prompt"], chat=chat)
        if not context:
            raise ValueError(f"pair {index}: the prompt is empty after tokenization; expected at least one token")
        for field in ("chosen", "rejected"):
            completion = list(tokenizer(pair[field], add_special_tokens=False).input_ids)
            if not completion:
                raise ValueError(f"pair {index}: {field!r} is empty after tokenization; expected at least one token")
            requests.append((context, completion))
    return requests


def preference_margins(model, requests: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 4) -> list[float]:
    """Per pair of ``preference_requests``: summed log-prob of the chosen minus the rejected completion."""
    scores = [logprob for logprob, _ in continuation_logprobs(model, requests, batch_size=batch_size)]
    return [chosen - rejected for chosen, rejected in zip(scores[0::2], scores[1::2])]


def preference_accuracy(margins: Sequence[float]) -> float:
    """The share of pairs whose chosen completion is strictly more likely (margin > 0; a tie is wrong)."""
    return sum(m > 0 for m in margins) / len(margins)


def preference_scores(
    model, requests: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 4
) -> tuple[float, float]:
    """(accuracy, mean margin) from ``preference_requests``: chosen beats rejected strictly."""
    margins = preference_margins(model, requests, batch_size=batch_size)
    return preference_accuracy(margins), sum(margins) / len(margins)


# ---------------------------------------------------------------------------------------------- CLI


def _check_arguments(args: argparse.Namespace) -> None:
    if args.text is None and args.pairs is None:
        raise ValueError("nothing to evaluate: expected --text FILE_OR_DIR, --pairs FILE.jsonl or both")
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2 (one context token and one scored token), got {args.seq_len}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out is not None:
        out = Path(args.out)
        if out.exists() and not (args.force and out.is_file()):
            raise ValueError(f"--out {out} already exists (pass --force to replace a file)")
        if not out.parent.is_dir():
            raise ValueError(f"--out {out}: the folder {out.parent} does not exist")


def write_result(path: str | Path, result: dict) -> None:
    """Writes ``result`` as JSON through a temporary file beside ``path``: never half-written."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(result, file, indent=2)
            file.write("\n")
        follow_umask(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def evaluate(args: argparse.Namespace) -> dict:
    """Checks every input, then loads the model and computes the results dict."""
    from .chat import load_tokenizer, require_chat_template
    from .model.hf import load_pretrained

    start = time.perf_counter()
    _check_arguments(args)
    path = Path(args.model)
    CheckpointReader(path)  # one-line errors for a missing folder or one that is not a checkpoint
    tokenizer = load_tokenizer(path)
    windows, requests = None, None
    if args.text is not None:
        texts = read_texts(args.text, args.text_field)
        windows = token_windows(
            encoded_documents(tokenizer, texts), args.seq_len, tokenizer.eos_token_id, args.max_tokens
        )
        if not windows:
            raise ValueError(f"--text {args.text}: fewer than 2 tokens of text; expected some text to score")
    if args.pairs is not None:
        if args.chat:
            require_chat_template(tokenizer, path, "drop --chat to score the prompts as plain text")
        requests = preference_requests(tokenizer, read_pairs(args.pairs), chat=args.chat)
    model = load_pretrained(path, device=args.device, dtype=args.dtype, backend=args.backend).eval()
    result: dict = {
        "checkpoint": str(path),
        "loss": None,
        "perplexity": None,
        "tokens": None,
        "seq_len": args.seq_len,
        "preference_accuracy": None,
        "reward_margin": None,
        "pairs": None,
    }
    if windows is not None:
        nll, tokens = heldout_nll(model, windows, batch_size=args.batch_size)
        loss = nll / tokens
        result.update(loss=loss, perplexity=math.exp(loss) if loss < 700 else math.inf, tokens=tokens)
    if requests is not None:
        accuracy, margin = preference_scores(model, requests, batch_size=args.batch_size)
        result.update(preference_accuracy=accuracy, reward_margin=margin, pairs=len(requests) // 2)
    result["seconds"] = time.perf_counter() - start
    return result


def _table(result: dict) -> str:
    rows = [("checkpoint", result["checkpoint"])]
    if result["loss"] is not None:
        rows += [
            ("loss (nats/token)", f"{result['loss']:.4f}"),
            ("perplexity", f"{result['perplexity']:.3f}"),
            ("scored tokens", f"{result['tokens']} (windows of {result['seq_len']})"),
        ]
    if result["pairs"] is not None:
        rows += [
            ("preference accuracy", f"{result['preference_accuracy']:.4f} of {result['pairs']} pairs"),
            ("reward margin (nats)", f"{result['reward_margin']:.4f}"),
        ]
    rows.append(("seconds", f"{result['seconds']:.1f}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(args: argparse.Namespace) -> int:
    """Runs ``solar eval``: 0 when done, 2 (one line on stderr) on bad input, 130 on Ctrl-C."""
    try:
        result = evaluate(args)
        if args.out is not None:
            write_result(args.out, result)
    except (ValueError, OSError, RuntimeError, CheckpointError) as error:
        print(f"solar eval: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    print(_table(result))
    return 0
