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
  model brings new plain tokens, at most one of them (added tokens always agree). Without a base
  model mergekit's "first model" is also a set's pick; here it is the first listed.

Rows, for every tensor with a vocabulary axis (``model.embed_tokens.weight``, ``lm_head.weight``):
model m's row for token x is m's own row when m has x; otherwise, the same for every model lacking x:
the row of the one model that has x, else the base model's row when the base is merged and has x,
else the mean of the rows of the models that have x (summed in the models' order in the compute
dtype, then divided by their count), else zeros. mergekit's ``tokenizer:`` block adds
``pad_to_multiple_of`` (the vocabulary padded to a multiple with the mean of the rebuilt rows) and
``tokens`` (``TokenSource``: each named token is added to the vocabulary if new, and its row for the
models that lack it, every model with ``force``, is a given model's row for it, a given model's
row for another token or id, or zeros). Embedding rows beyond a model's tokens (padding) are
dropped, as mergekit does; config.json's ``vocab_size`` becomes the output's row count.

The output's tokenizer files are the source's (copied as the other side files are); with new
tokens (``union``, ``tokens``), tokenizer.json gets them as added tokens (``tokenizer_config.json``'s ``added_tokens_decoder``
too, when it has one). mergekit re-saves the tokenizer with transformers instead, which formats
the JSON differently, lists the special tokens named in tokenizer_config.json as added tokens too
and rewrites tokenizer_config.json; the vocabulary and the new tokens' entries are the same.

Refused with a one-line error before anything is written: a model without tokenizer.json, a token
id at or past its config ``vocab_size`` (mergekit drops or fails on those), embedding rows that are
not ``vocab_size``, a ``tokens`` entry that cannot be met (its model not merged or lacking the
token or row; no source where one is needed) and new ``tokens`` with ``source: base`` (mergekit
0.1.5 fails on those).
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
        raise ValueError(
            f"{where}: every model needs a tokenizer.json (to build the output vocabulary); {model} has none"
        )
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
            raise ValueError(
                f"{where}: {path} has {len(beyond)} token ids at or past the model's vocab_size "
                f"{vocab_size} (first {beyond[0]}); expected every id below vocab_size"
            )
    return Vocabulary(Path(model), data, tokens, plain, added)


def _config_vocab_size(model: Path) -> int | None:
    try:
        value = json.loads((Path(model) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class TokenSource:
    """One entry of mergekit's ``tokenizer: tokens:`` block: where token's row comes from for the
    models that lack it (every model with ``force``): ``kind`` "model" (``model``'s row for the
    token), "model_token" (``model``'s row for ``token`` or row ``token_id``), "zero", or None (no
    source: the token is only added to the vocabulary)."""

    kind: str | None
    model: Path | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


def parse_tokens(where: str, raw, resolve) -> dict[str, TokenSource]:
    """The ``tokens:`` mapping of a recipe, model paths resolved with ``resolve(where, path)``; else a
    one-line ValueError."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of tokens to {{source: ..., force: ...}}, got {raw!r}")
    parsed = {}
    for token, entry in raw.items():
        here = f"{where}[{token!r}]"
        if not isinstance(token, str) or not isinstance(entry, dict) or set(entry) - {"source", "force"}:
            raise ValueError(
                f"{here}: expected a token (a string) mapped to {{source: ..., force: ...}}, got {token!r}: {entry!r}"
            )
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise ValueError(f"{here}: force must be true or false, got {force!r}")
        source = entry.get("source")
        if source is None:
            parsed[token] = TokenSource(None, force=force)
        elif isinstance(source, str):
            parsed[token] = TokenSource("model", resolve(f"{here}: source", source), force=force)
        elif isinstance(source, dict) and source.get("kind") == "zero" and set(source) == {"kind"}:
            parsed[token] = TokenSource("zero", force=force)
        elif (
            isinstance(source, dict)
            and source.get("kind") == "model_token"
            and set(source) - {"kind"} in ({"model", "token"}, {"model", "token_id"})
            and (
                isinstance(source.get("token"), str)
                or (
                    isinstance(source.get("token_id"), int)
                    and not isinstance(source.get("token_id"), bool)
                    and source["token_id"] >= 0
                )
            )
        ):
            parsed[token] = TokenSource(
                "model_token",
                resolve(f"{here}: source", source["model"]),
                source.get("token"),
                source.get("token_id"),
                force,
            )
        else:
            raise ValueError(
                f"{here}: source must be a model path, {{kind: zero}} or {{kind: model_token, model: "
                f"PATH, token: TOKEN}} (or token_id: N instead of token), got {source!r}"
            )
    return parsed


def token_source_yaml(rule: TokenSource) -> dict:
    """``rule`` as a ``tokens:`` entry of a recipe (the inverse of ``parse_tokens``)."""
    if rule.kind == "model":
        source = str(rule.model)
    elif rule.kind == "model_token":
        source = {
            "kind": "model_token",
            "model": str(rule.model),
            **({"token": rule.token} if rule.token is not None else {"token_id": rule.token_id}),
        }
    else:
        source = {"kind": "zero"} if rule.kind == "zero" else None
    return {"source": source, **({"force": True} if rule.force else {})}


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
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    originals: dict[Path, dict[str, int]] = field(default_factory=dict)
    model_rows: dict[Path, int | None] = field(default_factory=dict)

    def row_sources(self, models: Sequence[Path], base_model: Path | None) -> dict[int, tuple]:
        """For every output token that some of ``models`` lack (or whose ``tokens`` entry forces
        it), where the row for those models comes from, as mergekit decides it: ("row", model index,
        row), ("mean", model indices) or ("zero",). A one-line ValueError when a ``tokens`` entry
        cannot be met (merge and upscale ask before any work)."""
        keys = [Path(m).resolve() for m in models]
        base_key = Path(base_model).resolve() if base_model is not None else None
        order = [self.permutations[key] for key in keys]
        sources: dict[int, tuple] = {}
        for token, token_id in self.vocab.items():
            rule = self.tokens.get(token)
            having = [i for i, p in enumerate(order) if p[token_id] >= 0]
            if not (rule and rule.force) and len(having) == len(order):
                continue
            where = f"tokenizer: tokens[{token!r}]"
            if rule is None:
                if len(having) == 1:
                    sources[token_id] = ("row", having[0], order[having[0]][token_id])
                elif not having:
                    logger.debug("token %r is in none of %s: its row is zeros", token, [str(m) for m in models])
                    sources[token_id] = ("zero",)
                elif base_key in keys and self.permutations[base_key][token_id] >= 0:
                    sources[token_id] = ("row", keys.index(base_key), self.permutations[base_key][token_id])
                else:
                    sources[token_id] = ("mean", having)
            elif rule.kind == "zero":
                sources[token_id] = ("zero",)
            elif rule.kind is None:
                lacking = [str(models[i]) for i, p in enumerate(order) if p[token_id] < 0]
                reason = "force: true is set" if rule.force else f"{', '.join(lacking)} lack(s) the token"
                raise ValueError(
                    f"{where}: a source is needed ({reason}), got none; give source: a model path, "
                    f"{{kind: zero}} or {{kind: model_token, ...}}"
                )
            else:
                key = rule.model.resolve()
                if key not in keys:
                    raise ValueError(
                        f"{where}: source model {rule.model} is not among the models of this tensor "
                        f"({', '.join(map(str, models))})"
                    )
                if rule.kind == "model":
                    if self.permutations[key][token_id] < 0:
                        raise ValueError(f"{where}: source model {rule.model} has no token {token!r}")
                    sources[token_id] = ("row", keys.index(key), self.permutations[key][token_id])
                else:
                    row = rule.token_id if rule.token is None else self.originals[key].get(rule.token)
                    limit = self.model_rows.get(key)
                    if row is None:
                        raise ValueError(f"{where}: source model {rule.model} has no token {rule.token!r}")
                    if limit is not None and row >= limit:
                        raise ValueError(f"{where}: token_id must be below the {limit} rows of {rule.model}, got {row}")
                    sources[token_id] = ("row", keys.index(key), row)
        return sources

    def rebuild(
        self, tensors: Sequence[torch.Tensor], models: Sequence[Path], base_model: Path | None
    ) -> list[torch.Tensor]:
        """The models' vocabulary tensors (rows first; ``tensors[i]`` is ``models[i]``'s) in the output
        vocabulary, as mergekit's ``PermutedVocabulary``; ``base_model`` is the base when it is merged."""
        keys = [Path(m).resolve() for m in models]
        count = len(self.vocab)
        dtype = tensors[0].dtype
        for tensor in tensors:
            dtype = torch.promote_types(dtype, tensor.dtype)
        shape = tuple(tensors[0].shape[1:])
        for model, tensor in zip(models, tensors):
            if tuple(tensor.shape[1:]) != shape:
                raise ValueError(
                    f"tokenizer_source: {model}: a vocabulary tensor has rows of shape "
                    f"{list(tensor.shape[1:])}, expected {list(shape)} as in {models[0]}"
                )
        ids = [torch.tensor(self.permutations[key], dtype=torch.long) for key in keys]
        defaults: dict[int, torch.Tensor] = {}
        for token_id, (kind, *where) in self.row_sources(models, base_model).items():
            if kind == "row":
                defaults[token_id] = tensors[where[0]][where[1]]
            elif kind == "zero":
                defaults[token_id] = tensors[0].new_zeros(shape)
            else:  # summed in the models' order in the promoted dtype, then divided, as mergekit
                mean = torch.zeros(shape, dtype=dtype)
                for i in where[0]:
                    mean = mean + tensors[i][ids[i][token_id]]
                mean /= len(where[0])
                defaults[token_id] = mean
        forced = {self.vocab[token] for token, rule in self.tokens.items() if rule.force}
        rebuilt = []
        for tensor, index in zip(tensors, ids):
            new = torch.zeros((self.rows, *shape), dtype=dtype)
            present = index >= 0
            new[:count][present] = tensor[index[present]].to(dtype)
            for token_id, row in defaults.items():
                if index[token_id] < 0 or token_id in forced:
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


PLAIN_FLAGS = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}


def _union(base: Vocabulary, others: Sequence[Vocabulary]) -> tuple[dict[str, int], list[dict]]:
    """mergekit's union: see the module docstring. Returns (vocab, new added-token entries)."""
    vocab = dict(base.tokens)
    added_contents = {entry["content"] for vocabulary in (base, *others) for entry in vocabulary.added}
    new_added: list[dict] = []

    def add(content: str, flags: dict) -> None:
        entry = {"id": len(vocab), "content": content, **flags}
        vocab[content] = entry["id"]
        new_added.append(entry)

    for vocabulary in (base, *others):
        for token in vocabulary.plain:
            if token not in vocab and token not in added_contents:
                add(token, PLAIN_FLAGS)
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
    return vocab, new_added


def plan_tokenizer(
    where: str,
    tokenizer_source,
    models: Sequence[Path],
    base_model: Path | None,
    vocab_sizes: dict[Path, int | None],
    rows: dict[Path, int | None],
    pad_to_multiple_of: int | None = None,
    tokens: dict[str, TokenSource] | None = None,
) -> TokenizerPlan:
    """The output vocabulary and every model's permutation, all checked; else a one-line ValueError.
    ``vocab_sizes``/``rows`` give each model's (and the base's) config vocab_size and embedding rows."""
    if tokenizer_source == "base":
        if base_model is None:
            raise ValueError(f"{where}: base needs base_model")
    elif tokenizer_source != "union" and not (
        isinstance(tokenizer_source, (str, Path)) and Path(tokenizer_source).is_dir()
    ):
        raise ValueError(f"{where} must be base, union or a local model directory, got {tokenizer_source!r}")
    if pad_to_multiple_of is not None and (
        isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1
    ):
        raise ValueError(f"{where}: pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
    inputs = list(dict.fromkeys(Path(m) for m in ([base_model] if base_model is not None else []) + list(models)))
    vocabularies: dict[Path, Vocabulary] = {}
    for model in inputs:
        key = model.resolve()
        size, count = vocab_sizes.get(key), rows.get(key)
        if size is not None and count is not None and count != size:
            raise ValueError(
                f"{where}: {model} has {count} embedding rows but config.json vocab_size {size}; "
                f"expected as many rows as vocab_size"
            )
        vocabularies.setdefault(key, read_vocabulary(where, model, size if size is not None else count))
    first = vocabularies[inputs[0].resolve()]  # the base model, else the first model
    new_added: list[dict] = []
    if tokenizer_source == "union":
        vocab, new_added = _union(first, [v for key, v in vocabularies.items() if key != first.path.resolve()])
        donor = first.path
    elif tokenizer_source == "base":
        vocab, donor = dict(first.tokens), first.path
    else:
        donor = Path(tokenizer_source)
        vocab = dict(read_vocabulary(where, donor, _config_vocab_size(donor)).tokens)
    tokens = dict(tokens or {})
    for token in tokens:  # mergekit adds every token the tokens: block names
        if token not in vocab:
            if tokenizer_source == "base":
                raise ValueError(
                    f"{where}: tokenizer: tokens: {token!r} is not in the base vocabulary; adding tokens "
                    f"to source: base is not supported (mergekit 0.1.5 fails on it), use source: union"
                )
            new_added.append({"id": len(vocab), "content": token, **PLAIN_FLAGS})
            vocab[token] = len(vocab)
    tokenizer_json = None
    if new_added:
        donor_data = first.data if donor == first.path else read_vocabulary(where, donor).data
        tokenizer_json = json.loads(json.dumps(donor_data))
        tokenizer_json["added_tokens"] = sorted(
            [*(tokenizer_json.get("added_tokens") or []), *new_added], key=lambda entry: entry["id"]
        )
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise ValueError(
            f"{where}: the output vocabulary ({donor / TOKENIZER_FILE}) has ids "
            f"{ids[0]}..{ids[-1]} for {len(ids)} tokens; expected every id from 0 to {len(ids) - 1}"
        )
    by_id = sorted(vocab, key=lambda token: vocab[token])
    permutations = {key: [v.tokens.get(token, -1) for token in by_id] for key, v in vocabularies.items()}
    size = len(vocab)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    missing = {str(v.path): sum(p < 0 for p in permutations[key]) for key, v in vocabularies.items()}
    logger.info(
        "tokenizer_source %s: %d tokens (%d rows) from %s; tokens each model lacks: %s",
        tokenizer_source,
        len(vocab),
        size,
        donor,
        missing,
    )
    plan = TokenizerPlan(
        tokenizer_source,
        donor,
        vocab,
        size,
        permutations,
        new_added,
        tokenizer_json,
        tokens,
        {key: v.tokens for key, v in vocabularies.items()},
        dict(rows),
    )
    for token, rule in tokens.items():
        if rule.model is not None and rule.model.resolve() not in vocabularies:
            raise ValueError(
                f"{where}: tokenizer: tokens[{token!r}]: source model {rule.model} is not one of the "
                f"models merged ({', '.join(str(m) for m in inputs)})"
            )
    return plan
