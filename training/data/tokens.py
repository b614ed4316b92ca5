"""IGNORE_INDEX and the token-level pieces every part of the data pipeline shares: encoding text without
special tokens, the tokenizer's special ids (a required one, the bos it adds by itself), labels from a
mask of trained tokens, and the check of an example's ``input_ids``/``labels``."""

from __future__ import annotations

from collections.abc import Mapping

IGNORE_INDEX = -100


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


def _leading_bos(tokenizer) -> list[int]:
    """[bos] when the tokenizer adds a bos by itself (Llama-style), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _with_bos(bos: list[int], ids: list[int], trained: list[bool]) -> tuple[list[int], list[bool]]:
    if bos and (not ids or ids[0] != bos[0]):
        return bos + ids, [False] + trained
    return ids, trained


def _shifted_labels(input_ids: list[int], trained: list[bool]) -> list[int]:
    """labels[t] = input_ids[t+1] where token t+1 is trained, else -100; the last label is -100."""
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids[1:], trained[1:])]
    return labels + [IGNORE_INDEX]
