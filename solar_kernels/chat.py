"""``solar generate`` and ``solar chat``: text from a Hugging Face checkpoint directory, streamed.

Both load the model with ``load_pretrained`` and its tokenizer with transformers' ``AutoTokenizer``
(``trust_remote_code=False``; a ``tokenizer_config.json`` naming remote code in ``auto_map`` is
refused), then decode with a KV cache one token at a time, printing the text as it grows: greedy
by default, sampled with ``--temperature`` (filtered by ``--top-k``/``--top-p``, reproducible with
``--seed``). Decoding stops after ``--max-new-tokens`` or at an end-of-sequence token: the ids in
``generation_config.json``'s ``eos_token_id`` (an int or a list), the config's and the tokenizer's.

- ``generate`` continues a plain-text prompt (the arguments, or stdin when none are given); with
  ``--chat`` the prompt is one user turn under the checkpoint's chat template.
- ``chat`` reads user turns from stdin, one per line, until EOF, keeping the whole conversation:
  each reply is generated from the chat template applied to every earlier turn and reply.

The decoding loop mirrors ``solar_kernels.model.generate`` for one prompt (same cache, attention
mask and ``sample_next``), so its tokens are the ones ``generate`` returns.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from .checkpoint import REMOTE_CODE_KEY, CheckpointError, CheckpointReader

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class Sampling:
    """How each next token is chosen (temperature 0: greedy)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


# tokenizer_config.json's tokenizer_class values that name transformers' generic fast tokenizer
# (TokenizersBackend is its name in transformers 5; PreTrainedTokenizerFast an alias of it)
PLAIN_FAST_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")


def auto_tokenizer_class(path: str | Path) -> type:
    """The transformers class that loads the tokenizer in ``path``: ``PreTrainedTokenizerFast`` for a
    plain fast tokenizer (a tokenizer.json, and tokenizer_config.json's tokenizer_class one of
    ``PLAIN_FAST_TOKENIZERS``: what solar convert writes), the class AutoTokenizer picks for it,
    imported without AutoTokenizer's import of every model's modules (they pull in torch._dynamo,
    scikit-learn, SciPy and pandas: 0.30 GiB resident for the rest of the process); else
    ``AutoTokenizer``. ImportError without transformers."""
    path = Path(path)
    try:
        tokenizer_config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        tokenizer_config = None  # AutoTokenizer reads (and reports) whatever is there
    plain = isinstance(tokenizer_config, dict) and tokenizer_config.get("tokenizer_class") in PLAIN_FAST_TOKENIZERS
    if plain and (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast
    from transformers import AutoTokenizer

    return AutoTokenizer


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, never running code the directory names (one-line errors)."""
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{path}: no tokenizer (expected {' or '.join(TOKENIZER_FILES)} beside config.json)")
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        try:
            tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{config_file}: not valid JSON ({error})") from None
        if isinstance(tokenizer_config, dict) and REMOTE_CODE_KEY in tokenizer_config:
            raise CheckpointError(
                f"{config_file}: names remote code ({REMOTE_CODE_KEY}), which is never run; "
                f"expected a tokenizer transformers loads with its own classes"
            )
    try:
        tokenizer_class = auto_tokenizer_class(path)
    except ImportError as error:
        raise CheckpointError(f"loading a tokenizer needs transformers (pip install transformers): {error}") from None
    try:
        return tokenizer_class.from_pretrained(str(path), trust_remote_code=False)
    except Exception as error:  # transformers and tokenizers raise many types for a broken file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"{path}: the tokenizer does not load ({type(error).__name__}: {first_line})") from None


def require_chat_template(tokenizer, path: str | Path, hint: str) -> None:
    """A one-line error (ending with ``hint``) when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(
            f"{path}: the tokenizer has no chat template (tokenizer_config.json chat_template "
            f"or chat_template.jinja); {hint}"
        )


def end_of_sequence_ids(path: str | Path, tokenizer, model_config) -> set[int]:
    """Every id that ends a reply: generation_config.json's eos_token_id, the config's, the tokenizer's."""
    ids: set[int] = set()
    generation_file = Path(path) / "generation_config.json"
    if generation_file.is_file():
        try:
            generation = json.loads(generation_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{generation_file}: not valid JSON ({error})") from None
        eos = generation.get("eos_token_id") if isinstance(generation, dict) else None
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    for eos in (model_config.eos_token_id, tokenizer.eos_token_id):
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CheckpointError(f"{path}: eos_token_id must be ints, got {sorted(map(repr, ids))}")
    return ids


@torch.no_grad()
def stream_tokens(model, prompt: list[int], sampling: Sampling, eos_ids: set[int]) -> Iterator[int]:
    """Yields new token ids one at a time (an end-of-sequence id is yielded, then decoding stops)."""
    from .model.generate import sample_next
    from .model.transformer import KVCache

    if not prompt:
        raise ValueError("the prompt is empty after tokenization; expected at least one token")
    parameter = next(model.parameters())
    device, length, steps = parameter.device, len(prompt), sampling.max_new_tokens
    generator = None
    if sampling.temperature > 0 and sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    cache = KVCache(model.config, 1, length + steps, device=device, dtype=parameter.dtype)
    mask = torch.ones((1, length + steps), dtype=torch.long, device=device)
    logits = model(torch.tensor([prompt], device=device), attention_mask=mask[:, :length], cache=cache)[:, -1]
    for step in range(steps):
        next_id = sample_next(
            logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, generator=generator
        )
        token = int(next_id[0])
        yield token
        if token in eos_ids or step == steps - 1:
            return
        logits = model(next_id[:, None], attention_mask=mask[:, : length + step + 1], cache=cache)[:, -1]


def stream_reply(tokenizer, tokens: Iterable[int], eos_ids: set[int], out: TextIO) -> tuple[list[int], str]:
    """Writes the text of ``tokens`` to ``out`` as it grows (holding back a partial UTF-8
    character); returns the ids before any end-of-sequence token and their text."""
    ids: list[int] = []
    printed = ""
    for token in tokens:
        if token in eos_ids:
            break
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") or not text.startswith(printed):
            continue  # an incomplete byte sequence: wait for the rest of the character
        out.write(text[len(printed) :])
        out.flush()
        printed = text
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if text.startswith(printed) and text != printed:
        out.write(text[len(printed) :])
        out.flush()
    return ids, text


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template, ending with the assistant's turn."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def chat_loop(
    model,
    tokenizer,
    lines: Iterable[str],
    out: TextIO,
    sampling: Sampling,
    eos_ids: set[int],
    *,
    system: str | None = None,
    prompt_marker: str = "",
) -> list[dict]:
    """One reply per non-empty input line, each from the whole conversation so far; returns it."""
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    if prompt_marker:
        out.write(prompt_marker)
        out.flush()
    for line in lines:
        content = line.rstrip("\r\n")
        if content.strip():
            messages.append({"role": "user", "content": content})
            _, reply = stream_reply(
                tokenizer, stream_tokens(model, chat_prompt(tokenizer, messages), sampling, eos_ids), eos_ids, out
            )
            out.write("\n")
            messages.append({"role": "assistant", "content": reply})
        if prompt_marker:
            out.write(prompt_marker)
            out.flush()
    return messages


# ---------------------------------------------------------------------------------------------- CLI


def _load(args: argparse.Namespace):
    from .model.hf import load_pretrained

    path = Path(args.model)
    CheckpointReader(path)  # one-line errors for a missing folder or one that is not a checkpoint
    tokenizer = load_tokenizer(path)
    if args.chat_command == "chat" or getattr(args, "chat", False):
        require_chat_template(tokenizer, path, "use solar generate without --chat for plain text")
    model = load_pretrained(path, device=args.device, dtype=args.dtype, backend=args.backend).eval()
    return model, tokenizer, end_of_sequence_ids(path, tokenizer, model.config)


def _generate(args: argparse.Namespace, sampling: Sampling, stdin: TextIO, stdout: TextIO) -> None:
    text = " ".join(args.prompt) if args.prompt else stdin.read()
    if not text.strip():
        raise ValueError("empty prompt: give it as arguments or on stdin")
    model, tokenizer, eos_ids = _load(args)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = chat_prompt(tokenizer, [*messages, {"role": "user", "content": text}])
    else:
        prompt = tokenizer(text).input_ids
    stream_reply(tokenizer, stream_tokens(model, prompt, sampling, eos_ids), eos_ids, stdout)
    stdout.write("\n")


def run(args: argparse.Namespace, *, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Runs ``solar generate`` or ``solar chat``: 0 when done, 2 (one line on stderr) on bad input,
    130 on Ctrl-C."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    command = getattr(args, "chat_command", "generate")
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    try:
        sampling.check()
        if command == "generate":
            _generate(args, sampling, stdin, stdout)
        else:
            model, tokenizer, eos_ids = _load(args)
            chat_loop(
                model,
                tokenizer,
                stdin,
                stdout,
                sampling,
                eos_ids,
                system=args.system,
                prompt_marker="> " if stdin.isatty() else "",
            )
    except (ValueError, OSError, RuntimeError) as error:
        print(f"solar {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stdout.write("\n")
        return 130
    return 0
