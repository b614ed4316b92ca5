"""Issue 9 on the data side: bad bytes in data files and tokenizers that would run code are one-line
errors, pairs without a preference are dropped, and nothing in the data pipeline is unpickled."""

from __future__ import annotations

import builtins
import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest

pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from training.data import dpo_examples, load_records  # noqa: E402
from training.tokenizer import load_tokenizer  # noqa: E402


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- non-UTF-8 data files


def _bad_bytes(kind: str) -> bytes:
    """A small data file of ``kind`` whose third record holds a Latin-1 "é" (0xe9), not UTF-8."""
    if kind == ".jsonl":
        return b'{"text": "one"}\n{"text": "two \xc3\xa9"}\n{"text": "caf\xe9"}\n{"text": "four"}\n'
    if kind == ".json":
        return b'[{"text": "one"},\n {"text": "two \xc3\xa9"},\n {"text": "caf\xe9"}]\n'
    return b"one\ntwo \xc3\xa9\ncaf\xe9\nfour\n"


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("kind", [".jsonl", ".json", ".txt"])
def test_non_utf8_data_names_file_line_and_byte(tmp_path, kind, streaming):
    raw = _bad_bytes(kind)
    path = tmp_path / f"data{kind}"
    path.write_bytes(raw)
    offset = raw.index(b"\xe9")
    message = one_line_error(load_records, str(path), streaming=streaming)
    assert message == (
        f"load_records: {path} is not UTF-8 text: byte 0xe9 at byte offset {offset} (line 3); "
        f"expected UTF-8 {kind} data"
    )


def test_non_utf8_found_past_a_chunk_boundary(tmp_path):
    # Files are read in 1 MiB chunks: a valid two-byte "é" straddles the first boundary (its 0xc3
    # ends chunk 1), and the bad byte comes in chunk 2; offset and line count across the boundary.
    raw = b"x" * ((1 << 20) - 2) + b"\n" + b"\xc3\xa9 fine\nmore\nbad \xff here\n"
    assert raw.index(b"\xc3") == (1 << 20) - 1
    path = tmp_path / "big.txt"
    path.write_bytes(raw)
    bad = raw.index(b"\xff")
    assert one_line_error(load_records, path) == (
        f"load_records: {path} is not UTF-8 text: byte 0xff at byte offset {bad} (line 4); expected UTF-8 .txt data"
    )
    # A file ending inside a multi-byte sequence is caught at its end.
    path.write_bytes(b"ok\ncut \xe2\x82")
    assert "byte 0xe2 at byte offset 7 (line 2)" in one_line_error(load_records, path)


def test_utf8_data_still_loads(tmp_path):
    path = tmp_path / "fine.jsonl"
    path.write_bytes(b'{"text": "caf\xc3\xa9"}\n{"text": "na\xc3\xafve"}\n')
    assert [r["text"] for r in load_records(path)] == ["café", "naïve"]
    assert [r["text"] for r in load_records(path, streaming=True)] == ["café", "naïve"]


# ----------------------------------------------------------------------------- tokenizers that run code


@pytest.fixture
def answer_yes(monkeypatch):
    """Answers "y" to any terminal prompt and records it: the worst case of transformers' [y/N]."""
    prompts: list[str] = []

    def fake_input(prompt=""):
        prompts.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr("sys.stdin", open("/dev/null"))  # and a closed terminal besides
    return prompts


def _tokenizer_with_code(workspace, tmp_path, marker: Path) -> Path:
    """The real small tokenizer plus a module that, once imported, leaves ``marker`` behind."""
    folder = tmp_path / "tokenizer"
    shutil.copytree(workspace / "tokenizer", folder)
    (folder / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast, PretrainedConfig\n"
        "class EvilTokenizerFast(PreTrainedTokenizerFast):\n    pass\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    return folder


def test_tokenizer_auto_map_is_refused_before_transformers(workspace, tmp_path, answer_yes, capsys, monkeypatch):
    marker = tmp_path / "code-ran"
    folder = _tokenizer_with_code(workspace, tmp_path, marker)
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config.pop("tokenizer_class")  # so transformers itself has no class of its own to fall back on
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizerFast"]}
    config_path.write_text(json.dumps(tokenizer_config))

    import transformers

    def not_called(*args, **kwargs):
        raise AssertionError("transformers was asked to load a tokenizer with an auto_map")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoTokenizer, "from_pretrained", not_called)
        message = one_line_error(load_tokenizer, folder)
    assert message == (
        f"load_tokenizer: {config_path} has an auto_map ({tokenizer_config['auto_map']!r}): it needs Python "
        f"code shipped with the tokenizer, which is never run here; expected a tokenizer transformers loads "
        f"by itself (tokenizer.json), without auto_map"
    )
    one_line_error(load_tokenizer, folder)  # and with transformers in place
    assert answer_yes == [] and "[y/N]" not in capsys.readouterr().out
    assert not marker.exists()


def test_checkpoint_config_auto_map_never_prompts_or_runs(workspace, tmp_path, answer_yes, capsys):
    # A checkpoint folder (the tokenizer's default home) whose config.json asks for custom code:
    # transformers reads it for the tokenizer class; with trust_remote_code=False it falls back to the
    # plain config and the tokenizer files load as they are.
    marker = tmp_path / "code-ran"
    folder = _tokenizer_with_code(workspace, tmp_path, marker)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}})
    )
    tokenizer = load_tokenizer(folder)
    assert tokenizer.eos_token_id == load_tokenizer(workspace / "tokenizer").eos_token_id
    assert answer_yes == [] and "[y/N]" not in capsys.readouterr().out
    assert not marker.exists()


def test_tokenizer_config_must_be_json(workspace, tmp_path):
    folder = tmp_path / "tokenizer"
    shutil.copytree(workspace / "tokenizer", folder)
    (folder / "tokenizer_config.json").write_text('{"eos_token": "</s>",\n  "auto_map": }\n')
    message = one_line_error(load_tokenizer, folder)
    assert message == (
        f"load_tokenizer: {folder / 'tokenizer_config.json'} line 2, column 15: not valid JSON (Expecting value)"
    )


# ----------------------------------------------------------------------------- DPO pairs without a preference


def test_identical_pairs_are_dropped_with_one_warning(workspace, caplog):
    tokenizer = load_tokenizer(workspace / "tokenizer")
    long_start = " ".join(f"step {k}" for k in range(80))
    records = [
        {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."},
        {"prompt": "What is 1 + 1?", "chosen": "2.", "rejected": "2."},  # identical as text
        # Different only past max_length: identical once truncated, so no preference is left.
        {"prompt": "Count.", "chosen": long_start + " done.", "rejected": long_start + " oops."},
        {"prompt": "What is 3 + 3?", "chosen": "6.", "rejected": "9."},
    ]
    with caplog.at_level(logging.WARNING, logger="training.data"):
        examples = dpo_examples(records, tokenizer, 48, 16, source="pairs.jsonl")
    kept = [dpo_examples([r], tokenizer, 48, 16)[0] for r in (records[0], records[3])]
    assert examples == kept
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "dpo_examples: dropped 2 of 4 pairs in pairs.jsonl whose chosen and rejected are identical (as text, "
        "or after tokenization and truncation to max_length=48): they carry no preference"
    ]


def test_all_pairs_identical_is_an_error(workspace, tmp_path):
    tokenizer = load_tokenizer(workspace / "tokenizer")
    path = tmp_path / "same.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{k}", "chosen": "a.", "rejected": "a."}) + "\n" for k in range(3)))
    message = one_line_error(dpo_examples, load_records(path), tokenizer, 64, 32, source=str(path))
    assert message == (
        f"dpo_examples: no pair left in {path}: all 3 pairs have chosen identical to rejected (as text, or after "
        f"tokenization and truncation to max_length=64); expected pairs that differ"
    )


# ----------------------------------------------------------------------------- nothing is unpickled


# (the source scan for unpickling and remote code, over the whole repository, is tests/test_safety.py)


def test_loading_and_tokenizing_never_unpickles(workspace, tmp_path, monkeypatch):
    # The data pipeline's only cache is datasets' Arrow files; a first load and a cached second load
    # of a local file, and the tokenization after, must not reach pickle at all.
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    tokenizer = load_tokenizer(workspace / "tokenizer")
    path = tmp_path / "pairs.jsonl"
    shutil.copy(workspace / "pairs.jsonl", path)
    first, cached = load_records(path), load_records(path)
    assert list(first) == list(cached) and len(first) > 0
    assert len(dpo_examples(cached, tokenizer, 128, 64)) == len(first)
