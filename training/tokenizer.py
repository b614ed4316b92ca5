"""Tokenizers for the training stages: train a small byte-level BPE, or load an existing one.

The ids of the special tokens follow Llama (and so SOLAR / Mistral): ``<unk>`` 0, ``<s>`` (bos) 1,
``</s>`` (eos) 2, and ``<pad>`` 3, which Llama lacks. This module is the one place that spells these
ids out; everything else asks the tokenizer (``tokenizer.eos_token_id`` ...).

A trained tokenizer is byte-level (GPT-2 style): every string is representable, so it needs no
normalizer and ``decode(encode(text)) == text``. It adds no special tokens by itself (no bos on
encode): the data pipeline (``training/data/``) places eos at document ends where it wants it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from solar_kernels.chat import auto_tokenizer_class

from .config import read_yaml_or_json

logger = logging.getLogger(__name__)

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "</s>", "<pad>"
# Order = id: the trainer assigns special tokens the first ids, in this order.
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(len(SPECIAL_TOKENS))

# Files any of transformers' tokenizer loaders can start from.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and save it to ``out_dir``; return it loaded.

    ``vocab_size`` counts everything: the 4 special tokens, the 256 byte symbols and the merges,
    so it must be at least 260 (the corpus may be too small to reach it; the result is then
    smaller). ``out_dir`` receives ``tokenizer.json`` and ``tokenizer_config.json`` (with bos, eos,
    pad and unk set), so ``transformers.AutoTokenizer.from_pretrained(out_dir)`` gives the same ids.
    The same texts give the same tokenizer (no randomness in BPE training; ties between equally
    frequent pairs are broken by the pair itself).
    """
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(
            f"train_bpe_tokenizer: vocab_size={vocab_size}, expected at least {minimum} "
            f"({len(SPECIAL_TOKENS)} special tokens + 256 byte symbols)"
        )
    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for token, expected_id in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS)), strict=True):
        assert tokenizer.token_to_id(token) == expected_id, (token, tokenizer.token_to_id(token))

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    logger.info("trained a byte-level BPE with %d tokens, saved to %s", len(wrapped), out_dir)
    return wrapped


def load_tokenizer(path) -> PreTrainedTokenizerFast:
    """Load a tokenizer with ``transformers.AutoTokenizer`` from a directory (or a cached hub name;
    a plain fast tokenizer through its class directly, ``solar_kernels.chat.auto_tokenizer_class``).

    Raises ``ValueError`` when the directory holds no tokenizer files or loading fails. A tokenizer
    without a pad token (Llama, SOLAR, Mistral ship none) gets ``pad = unk`` (or eos when there is
    no unk): padding positions carry label -100, so which id pads does not change the loss.

    Code shipped with a tokenizer is never run: a directory whose ``tokenizer_config.json`` has an
    ``auto_map`` is refused before transformers reads it, and transformers is called with
    ``trust_remote_code=False``, so it neither asks ``[y/N]`` on the terminal nor imports a
    ``.py`` from the directory or the hub (an ``auto_map`` in a checkpoint's ``config.json`` is
    ignored: transformers then falls back to the plain config).
    """
    path_str = os.fspath(path)
    if os.path.isdir(path_str):
        present = [name for name in _TOKENIZER_FILES if os.path.isfile(os.path.join(path_str, name))]
        if not present:
            raise ValueError(
                f"load_tokenizer: no tokenizer files in {path_str!r} (expected one of "
                f"{', '.join(_TOKENIZER_FILES)}; found {sorted(os.listdir(path_str))})"
            )
        _refuse_custom_code(Path(path_str))
    elif os.path.exists(path_str):
        raise ValueError(f"load_tokenizer: {path_str!r} is a file; expected a tokenizer directory")
    try:
        tokenizer = auto_tokenizer_class(path_str).from_pretrained(path_str, trust_remote_code=False)
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())  # transformers' messages span several lines
        raise ValueError(
            f"load_tokenizer: could not load a tokenizer from {path_str!r} (a local directory with "
            f"tokenizer.json, or a hub name already in the local cache): {reason}"
        ) from error
    if tokenizer.eos_token_id is None:
        raise ValueError(f"load_tokenizer: the tokenizer in {path_str!r} has no eos token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        logger.info("tokenizer %s has no pad token; padding with %r", path_str, tokenizer.pad_token)
    return tokenizer


def _refuse_custom_code(directory: Path) -> None:
    """A ``ValueError`` when the tokenizer asks transformers to import Python code (``auto_map``)."""
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return
    tokenizer_config = read_yaml_or_json(config_path, "load_tokenizer")
    if isinstance(tokenizer_config, dict) and "auto_map" in tokenizer_config:
        raise ValueError(
            f"load_tokenizer: {config_path} has an auto_map ({tokenizer_config['auto_map']!r}): it needs Python "
            f"code shipped with the tokenizer, which is never run here; expected a tokenizer transformers "
            f"loads by itself (tokenizer.json), without auto_map"
        )
