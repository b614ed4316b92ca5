"""mergekit's ``tokenizer_source`` (base, union or a model path): one output vocabulary, and every
model's embedding and LM-head rows rebuilt in it before the merge (as mergekit 0.1.5's
``tokenizer/build.py`` and ``tokenizer/embed.py``).

Vocabularies are read from each model's tokenizer.json (``model.vocab`` and ``added_tokens``: the
token -> id map transformers' ``get_vocab()`` gives) and config.json's ``vocab_size``.

The output vocabulary:
- ``base``: the base model's;
- a model directory: that model's;
- ``union``: the base model's (else the first model's), then every plain token of the other models
  it lacks, appended as an added token (``normalized: true``, ``special: false``), then every added
  token of every model (base first) it lacks, with its own flags; models in the recipe's order, a
  model's tokens in its id order. mergekit takes the models in a set's order and a model's plain
  tokens in a hash map's order, which change from run to run; the two agree whenever at most one
  model brings new plain tokens, at most one of them (added tokens always agree).

Rows, for every tensor with a vocabulary axis (``model.embed_tokens.weight``, ``lm_head.weight``):
model m's row for token x is m's own row when m has x; otherwise, the same for every model lacking x:
the row of the one model that has x, else the base model's row when the base is merged and has x,
else the mean of the rows of the models that have x (summed in the models' order in the compute
dtype, then divided by their count), else zeros. ``pad_to_multiple_of`` (mergekit's ``tokenizer:``
block) pads the vocabulary to a multiple with the mean of the rebuilt rows. Embedding rows beyond a
model's tokens (padding) are dropped, as mergekit does; config.json's ``vocab_size`` becomes the
output's row count.

The output's tokenizer files are the source's (``side_files``); for ``union`` with new tokens,
tokenizer.json gets them as added tokens (``tokenizer_config.json``'s ``added_tokens_decoder``
too, when it has one). mergekit re-saves the tokenizer with transformers instead, which formats
the JSON differently, lists the special tokens named in tokenizer_config.json as added tokens too
and rewrites tokenizer_config.json; the vocabulary and the new tokens' entries are the same.

Refused with a one-line error before anything is written: a model without tokenizer.json, a token
id at or past its config ``vocab_size`` (mergekit drops or fails on those), embedding rows that are
not ``vocab_size``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = ("base", "union")
# Tensors indexed by token along axis 0 (Llama/Mistral).
VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class Vocabulary:
    """One model's tokenizer.json: ``tokens`` maps every token (plain and added) to its id."""

    path: Path
    data: dict
    tokens: dict[str, int]
    plain: list[str]
    added: list[dict]


def read_vocabulary(where: str, model: Path, vocab_size: int | None = None) -> Vocabulary:
    """``model``'s vocabulary; every id must be below ``vocab_size`` (config.json's) when given."""
    path = Path(model) / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"{where}: every model needs a tokenizer.json (to build the output vocabulary); "
                         f"{model} has none")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        if isinstance(vocab, dict):
            plain = sorted(vocab, key=lambda token: vocab[token])
            tokens = {token: int(vocab[token]) for token in plain}
        else:  # Unigram: [piece, score] pairs, the id is the position
            plain = [piece[0] for piece in vocab]
            tokens = {token: i for i, token in enumerate(plain)}
        added = sorted((dict(entry) for entry in data.get("added_tokens") or []), key=lambda entry: entry["id"])
        for entry in added:
            tokens[entry["content"]] = int(entry["id"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError, ValueError) as error:
        raise ValueError(f"{where}: cannot read the vocabulary of {path} ({error!r})") from None
    if vocab_size is not None:
        beyond = sorted(i for i in tokens.values() if i >= vocab_size)
        if beyond:
            raise ValueError(f"{where}: {path} has {len(beyond)} token ids at or past the model's vocab_size "
                             f"{vocab_size} (first {beyond[0]}); expected every id below vocab_size")
    return Vocabulary(Path(model), data, tokens, plain, added)


def _config_vocab_size(model: Path) -> int | None:
    try:
        value = json.loads((Path(model) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class TokenizerPlan:
    """The output vocabulary and, per input model (by resolved path), the id of its row for every
    output token (-1: the model lacks it)."""

    source: object
    donor: Path
    vocab: dict[str, int]
    rows: int
    permutations: dict[Path, list[int]]
    new_added: list[dict] = field(default_factory=list)
    tokenizer_json: dict | None = None

    def rebuild(self, tensors: Sequence[torch.Tensor], models: Sequence[Path],
                base_model: Path | None) -> list[torch.Tensor]:
        """The models' vocabulary tensors (rows first; ``tensors[i]`` is ``models[i]``'s) in the output
        vocabulary, as mergekit's ``PermutedVocabulary``; ``base_model`` is the base when it is merged."""
        keys = [Path(m).resolve() for m in models]
        base_key = Path(base_model).resolve() if base_model is not None else None
        count = len(self.vocab)
        dtype = tensors[0].dtype
        for tensor in tensors:
            dtype = torch.promote_types(dtype, tensor.dtype)
        shape = tuple(tensors[0].shape[1:])
        for model, tensor in zip(models, tensors):
            if tuple(tensor.shape[1:]) != shape:
                raise ValueError(f"tokenizer_source: {model}: a vocabulary tensor has rows of shape "
                                 f"{list(tensor.shape[1:])}, expected {list(shape)} as in {models[0]}")
        order = [self.permutations[key] for key in keys]
        ids = [torch.tensor(p, dtype=torch.long) for p in order]
        defaults: dict[int, torch.Tensor] = {}
        for token_id in range(count):
            having = [i for i, p in enumerate(order) if p[token_id] >= 0]
            if len(having) == len(order):
                continue
            if len(having) == 1:
                defaults[token_id] = tensors[having[0]][order[having[0]][token_id]]
            elif not having:
                defaults[token_id] = tensors[0].new_zeros(shape)
            elif base_key in keys and self.permutations[base_key][token_id] >= 0:
                defaults[token_id] = tensors[keys.index(base_key)][self.permutations[base_key][token_id]]
            else:
                mean = torch.zeros(shape, dtype=dtype)
                for i in having:
                    mean = mean + tensors[i][order[i][token_id]]
                mean /= len(having)
                defaults[token_id] = mean
        rebuilt = []
        for tensor, index in zip(tensors, ids):
            new = torch.zeros((self.rows, *shape), dtype=dtype)
            present = index >= 0
            new[:count][present] = tensor[index[present]].to(dtype)
            for token_id, row in defaults.items():
                if index[token_id] < 0:
                    new[token_id] = row
            if self.rows > count:  # mergekit pads with the mean row (vocab-expansion heuristic)
                new[count:] = torch.mean(new[:count], dim=0)
            rebuilt.append(new)
        return rebuilt

    def write(self, directory: Path) -> None:
        """The union's tokenizer.json (and added_tokens_decoder) into the output ``directory``."""
        if self.tokenizer_json is None:
            return
        from ..checkpoint import write_json

        write_json(Path(directory) / TOKENIZER_FILE, self.tokenizer_json)
        tokenizer_config = Path(directory) / "tokenizer_config.json"
        if tokenizer_config.is_file():
            try:
                data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                return
            if isinstance(data, dict) and isinstance(data.get("added_tokens_decoder"), dict):
                for entry in self.new_added:
                    data["added_tokens_decoder"][str(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
                write_json(tokenizer_config, data)


def _union(base: Vocabulary, others: Sequence[Vocabulary]) -> tuple[dict[str, int], list[dict], dict]:
    """mergekit's union: see the module docstring. Returns (vocab, new added entries, tokenizer.json)."""
    vocab = dict(base.tokens)
    added_contents = {entry["content"] for vocabulary in (base, *others) for entry in vocabulary.added}
    new_added: list[dict] = []

    def add(content: str, flags: dict) -> None:
        entry = {"id": len(vocab), "content": content, **flags}
        vocab[content] = entry["id"]
        new_added.append(entry)

    plain_flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}
    for vocabulary in (base, *others):
        for token in vocabulary.plain:
            if token not in vocab and token not in added_contents:
                add(token, plain_flags)
    # Added tokens (first model's flags win); one the vocabulary has as a plain token keeps its id
    # and becomes an added token too, as tokenizers' add_tokens does.
    is_added = {entry["content"] for entry in base.added}
    for vocabulary in others:
        for entry in vocabulary.added:
            content = entry["content"]
            if content in is_added:
                continue
            is_added.add(content)
            flags = {k: v for k, v in entry.items() if k not in ("id", "content")}
            if content not in vocab:
                add(content, flags)
            else:
                new_added.append({"id": vocab[content], "content": content, **flags})
    data = json.loads(json.dumps(base.data))
    data["added_tokens"] = sorted([*(data.get("added_tokens") or []), *new_added], key=lambda entry: entry["id"])
    return vocab, new_added, data


def plan_tokenizer(where: str, tokenizer_source, models: Sequence[Path], base_model: Path | None,
                   vocab_sizes: dict[Path, int | None], rows: dict[Path, int | None],
                   pad_to_multiple_of: int | None = None) -> TokenizerPlan:
    """The output vocabulary and every model's permutation, all checked; else a one-line ValueError.
    ``vocab_sizes``/``rows`` give each model's (and the base's) config vocab_size and embedding rows."""
    if tokenizer_source == "base":
        if base_model is None:
            raise ValueError(f"{where}: base needs base_model")
    elif tokenizer_source != "union" and not (isinstance(tokenizer_source, (str, Path))
                                              and Path(tokenizer_source).is_dir()):
        raise ValueError(f"{where} must be base, union or a local model directory, got "
                         f"{tokenizer_source!r}")
    if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool)
                                           or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ValueError(f"{where}: pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
    inputs = list(dict.fromkeys(Path(m) for m in ([base_model] if base_model is not None else []) + list(models)))
    vocabularies: dict[Path, Vocabulary] = {}
    for model in inputs:
        key = model.resolve()
        size, count = vocab_sizes.get(key), rows.get(key)
        if size is not None and count is not None and count != size:
            raise ValueError(f"{where}: {model} has {count} embedding rows but config.json vocab_size {size}; "
                             f"expected as many rows as vocab_size")
        vocabularies.setdefault(key, read_vocabulary(where, model, size if size is not None else count))
    first = vocabularies[inputs[0].resolve()]  # the base model, else the first model
    new_added: list[dict] = []
    tokenizer_json = None
    if tokenizer_source == "union":
        others = [v for key, v in vocabularies.items() if key != first.path.resolve()]
        vocab, new_added, tokenizer_json = _union(first, others)
        donor = first.path
        if not new_added:
            tokenizer_json = None
    elif tokenizer_source == "base":
        vocab, donor = first.tokens, first.path
    else:
        donor = Path(tokenizer_source)
        vocab = read_vocabulary(where, donor, _config_vocab_size(donor)).tokens
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise ValueError(f"{where}: the output vocabulary ({donor / TOKENIZER_FILE}) has ids "
                         f"{ids[0]}..{ids[-1]} for {len(ids)} tokens; expected every id from 0 to {len(ids) - 1}")
    by_id = sorted(vocab, key=lambda token: vocab[token])
    permutations = {key: [v.tokens.get(token, -1) for token in by_id] for key, v in vocabularies.items()}
    size = len(vocab)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    missing = {str(v.path): sum(p < 0 for p in permutations[key]) for key, v in vocabularies.items()}
    logger.info("tokenizer_source %s: %d tokens (%d rows) from %s; tokens each model lacks: %s", tokenizer_source,
                len(vocab), size, donor, missing)
    return TokenizerPlan(tokenizer_source, donor, vocab, size, permutations, new_added, tokenizer_json)
