"""mergekit's ``tokenizer_source`` (base, union or a model path), for models that share one vocabulary.

mergekit builds the output tokenizer from the source (the base's, the union of all, or the given
model's) and rebuilds every model's embedding and LM-head rows in that vocabulary's order. When
every model has the same vocabulary (the same tokenizer.json ``model`` and ``added_tokens``) and as
many embedding rows as tokens, that rebuild keeps every row where it is, so the merge is the plain
merge and the tokenizer is the source's: that is what is done here (checked against mergekit).
Different vocabularies (rows to permute, tokens to average or zero) or padded embeddings are
refused with a one-line error before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

SOURCES = ("base", "union")


def _vocabulary(where: str, model: Path) -> tuple[object, object, int]:
    """(model section, added tokens, token count) of ``model``'s tokenizer.json."""
    path = Path(model) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{where}: tokenizer_source needs a tokenizer.json in every model to compare "
                         f"vocabularies; {model} has none")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        section, added = data["model"], data.get("added_tokens") or []
        vocab = section["vocab"]
        tokens = set(vocab) if isinstance(vocab, dict) else {piece[0] for piece in vocab}
        tokens |= {token["content"] for token in added}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError) as error:
        raise ValueError(f"{where}: cannot read the vocabulary of {path} ({error!r})") from None
    return section, added, len(tokens)


def tokenizer_donor(where: str, tokenizer_source, models: Sequence[Path], base_model: Path | None,
                    embedding_rows: int) -> Path:
    """The directory the output's tokenizer files come from, once every model (and the donor) is
    checked to share one vocabulary of ``embedding_rows`` tokens; else a one-line ValueError."""
    if tokenizer_source == "base":
        if base_model is None:
            raise ValueError(f"{where}: tokenizer_source: base needs base_model")
        donor = base_model
    elif tokenizer_source == "union":
        donor = base_model if base_model is not None else models[0]
    elif isinstance(tokenizer_source, (str, Path)) and Path(tokenizer_source).is_dir():
        donor = Path(tokenizer_source)
    else:
        raise ValueError(f"{where}: tokenizer_source must be base, union or a local model directory, got "
                         f"{tokenizer_source!r}")
    inputs = list(dict.fromkeys([donor, *([base_model] if base_model is not None else []), *models]))
    reference = _vocabulary(where, donor)
    for model in inputs:
        vocabulary = _vocabulary(where, model)
        if vocabulary[:2] != reference[:2]:
            raise ValueError(f"{where}: tokenizer_source {tokenizer_source!r}: {model} has a different vocabulary "
                             f"from {donor}; merging models with different vocabularies (embedding rows rebuilt) "
                             f"is not supported")
    if reference[2] != embedding_rows:
        raise ValueError(f"{where}: tokenizer_source {tokenizer_source!r}: the vocabulary has {reference[2]} tokens "
                         f"but the embeddings have {embedding_rows} rows; resizing embeddings is not supported")
    return donor
