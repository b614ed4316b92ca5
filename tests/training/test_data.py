"""Tests of training/data/ and training/tokenizer.py: records, token rows, labels, batches.

Everything runs on the CPU with a byte-level BPE trained here on a small corpus (no download).
The label convention under test: ``labels[t]`` is ``input_ids[t+1]`` or -100 (already shifted).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from training.data import (  # noqa: E402
    IGNORE_INDEX,
    BatchStream,
    collate_dpo,
    collate_lm,
    dpo_examples,
    load_records,
    num_tokens,
    pack_examples,
    packing_efficiency,
    pretrain_rows,
    sft_examples,
    solar_prompt,
    split_records,
)
from training.tokenizer import load_tokenizer, train_bpe_tokenizer  # noqa: E402

_WORDS = (
    "the model reads a document and predicts the next token while the optimizer updates every weight "
    "layers attention heads rotary positions normalize activations gradient descent converges slowly "
    "what is seven plus eight the answer is fifteen user assistant system please explain why"
).split()

# The chat template upstage ships with SOLAR-10.7B-Instruct-v1.0 (tokenizer_config.json).
UPSTAGE_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{% if message['content']%}"
    "{{'### System:\\n' + message['content']+'\\n\\n'}}{% endif %}{% elif message['role'] == 'user' %}"
    "{{'### User:\\n' + message['content']+'\\n\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'### Assistant:\\n'  + message['content']}}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}{% endfor %}"
)
# A template that writes eos itself after every message.
TAGGED_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _corpus(n=400):
    # Deterministic pseudo-sentences with numbers and the prompt-format markers, so BPE learns them.
    texts = []
    for i in range(n):
        words = [_WORDS[(i * 7 + k * 3) % len(_WORDS)] for k in range(6 + i % 9)]
        texts.append(f"### User:\n{' '.join(words)} {i % 97} + {i % 13}?\n\n### Assistant:\n{i % 97 + i % 13}.")
    return texts


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(_corpus(), 600, out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture
def fresh_tokenizer(tokenizer_dir):
    """A tokenizer of its own, for tests that set a chat template."""
    return AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _check_shifted(input_ids, labels):
    """The label convention: labels[t] is -100 or input_ids[t+1]; the last one is -100."""
    assert len(labels) == len(input_ids)
    assert labels[-1] == IGNORE_INDEX
    for t in range(len(input_ids) - 1):
        assert labels[t] in (IGNORE_INDEX, input_ids[t + 1]), t


def _labeled_spans(tokenizer, input_ids, labels):
    """Decoded runs of predicted tokens (token t+1 for each labeled position t)."""
    spans, current = [], []
    for t, label in enumerate(labels):
        if label != IGNORE_INDEX:
            current.append(input_ids[t + 1])
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(span) for span in spans]


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids_and_reload(tokenizer_dir, tokenizer):
    reloaded = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    for tok in (tokenizer, reloaded):
        assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
        assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert len(reloaded) == 600
    text = "The model reads 12 documents.\n\tx = y + 3  # a comment"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    # No bos added by itself: the data pipeline places special tokens.
    assert tokenizer(text)["input_ids"][0] != tokenizer.bos_token_id


@pytest.mark.parametrize(
    "text",
    ["hello world", "  leading and trailing  ", "tabs\tand\nnewlines\n\n", "symbols: ~!@#$%^&*()_+{}|<>?`", "Zq9!x"],
)
def test_tokenizer_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # Words of the training corpus are merged into few tokens, not spelled byte by byte.
    assert len(tokenizer("the model reads a document")["input_ids"]) <= 8


def test_tokenizer_is_deterministic(tmp_path, tokenizer_dir):
    train_bpe_tokenizer(_corpus(), 600, tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="at least 260"):
        train_bpe_tokenizer(["abc"], 100, tmp_path / "t")
    with pytest.raises(ValueError, match="no tokenizer files.*tokenizer.json"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_sets_missing_pad(tmp_path, tokenizer):
    no_pad = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    no_pad.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=False).pad_token_id is None
    assert load_tokenizer(tmp_path).pad_token_id == tokenizer.unk_token_id


# ----------------------------------------------------------------------------- load_records

RECORDS = [{"text": "first document"}, {"text": "second one"}, {"text": "third"}]


def _write(path, records):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".txt":
        path.write_text("".join(r["text"] + "\n" for r in records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", ".txt"])
def test_load_records_file_kinds(tmp_path, suffix):
    path = _write(tmp_path / f"data{suffix}", RECORDS)
    records = load_records(str(path), text_field="text")
    assert list(records) == RECORDS
    streamed = load_records(path, streaming=True)
    assert list(streamed) == RECORDS


def test_load_records_directory_and_list(tmp_path):
    _write(tmp_path / "b.jsonl", RECORDS[1:])
    _write(tmp_path / "a.jsonl", RECORDS[:1])
    (tmp_path / "notes.md").write_text("not data")
    assert list(load_records(tmp_path)) == RECORDS  # sorted file order, other suffixes ignored
    assert list(load_records([tmp_path / "b.jsonl", tmp_path / "a.jsonl"])) == RECORDS[1:] + RECORDS[:1]
    assert list(load_records(tmp_path / "a.jsonl", split="validation")) == RECORDS[:1]


def test_load_records_errors(tmp_path):
    with pytest.raises(ValueError, match="missing.jsonl"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="gone.parquet"):
        load_records([_write(tmp_path / "ok.jsonl", RECORDS), tmp_path / "gone.parquet"])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl' is empty"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(ValueError, match="none.json' is empty"):
        load_records(tmp_path / "none.json", streaming=True)
    with pytest.raises(ValueError, match="none.json.*empty"):
        load_records(tmp_path / "none.json")
    with pytest.raises(ValueError, match="nothing.parquet.*empty"):
        load_records(_empty_parquet(tmp_path))
    with pytest.raises(ValueError, match="no field 'content'.*'text'"):
        load_records(tmp_path / "ok.jsonl", text_field="content")
    (tmp_path / "mixed").mkdir()
    _write(tmp_path / "mixed" / "a.txt", RECORDS)
    _write(tmp_path / "mixed" / "b.jsonl", RECORDS)
    with pytest.raises(ValueError, match="mixes file kinds"):
        load_records(tmp_path / "mixed")


def _empty_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "nothing.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    return path


def test_load_records_hub_name_offline(monkeypatch):
    import datasets
    from huggingface_hub import constants

    # The environment variables are read at import; the constants are what the libraries consult.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    with pytest.raises(ValueError, match="no-such-org/no-such-dataset.*network"):
        load_records("no-such-org/no-such-dataset")


# ----------------------------------------------------------------------------- pretraining

DOCUMENTS = [
    "the model reads a document",
    "",  # blank: skipped
    "what is seven plus eight? the answer is fifteen, and the optimizer updates every weight " * 3,
    "a literal </s> inside a document is text",
    "   ",  # whitespace only: skipped
    "layers attention heads",
    "gradient descent converges slowly " * 4,
]


def test_pretrain_rows_pack_documents(tokenizer):
    seq_len = 16
    eos = tokenizer.eos_token_id
    rows = list(pretrain_rows([{"text": d} for d in DOCUMENTS], tokenizer, seq_len))

    kept = [d for d in DOCUMENTS if d.strip()]
    stream, starts = [], []
    for document in kept:
        starts.append(len(stream))
        stream += _encode(tokenizer, document) + [eos]
    assert stream.count(eos) == len(kept)  # "</s>" in a document stays text
    assert len(rows) == len(stream) // seq_len >= 5
    assert [t for row in rows for t in row["input_ids"]] == stream[: len(rows) * seq_len]

    for r, row in enumerate(rows):
        ids, labels, positions = row["input_ids"], row["labels"], row["position_ids"]
        assert len(ids) == len(labels) == len(positions) == seq_len
        row_start = r * seq_len
        for t in range(seq_len):
            g = row_start + t
            document_start = max([s for s in starts if s <= g] + [row_start])
            assert positions[t] == g - max(document_start, row_start), (r, t)
            expected = IGNORE_INDEX if t == seq_len - 1 or ids[t] == eos else ids[t + 1]
            assert labels[t] == expected, (r, t)
    # Every document's last text token predicts its eos.
    assert sum(label == eos for row in rows for label in row["labels"]) >= 3


def test_pretrain_rows_from_dataset_and_errors(tmp_path, tokenizer):
    path = _write(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    from_dataset = list(pretrain_rows(load_records(path), tokenizer, 8))
    from_stream = list(pretrain_rows(load_records(path, streaming=True), tokenizer, 8))
    assert from_dataset == from_stream == list(pretrain_rows([{"text": d} for d in DOCUMENTS], tokenizer, 8))
    with pytest.raises(ValueError, match="record 1 has no field 'text'"):
        list(pretrain_rows([{"text": "ok"}, {"body": "no"}], tokenizer, 8))
    with pytest.raises(ValueError, match="record 0 field 'body' is int"):
        list(pretrain_rows([{"body": 3}], tokenizer, 8, text_field="body"))


# ----------------------------------------------------------------------------- SFT


def test_sft_solar_format_and_labels(tokenizer):
    prompt, response = "What is 7 + 8?", "7 + 8 = 15.\nThe answer is 15."
    (example,) = sft_examples([{"prompt": prompt, "response": response}], tokenizer, 256)
    ids, labels = example["input_ids"], example["labels"]
    assert tokenizer.decode(ids) == f"### User:\n{prompt}\n\n### Assistant:\n{response}</s>"
    assert example["position_ids"] == list(range(len(ids)))
    _check_shifted(ids, labels)
    prompt_ids = _encode(tokenizer, solar_prompt(prompt))
    assert ids[: len(prompt_ids)] == prompt_ids
    # Exactly the response and eos are predicted: positions len(prompt)-1 .. n-2.
    labeled = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
    assert labeled == list(range(len(prompt_ids) - 1, len(ids) - 1))
    assert _labeled_spans(tokenizer, ids, labels) == [response + "</s>"]


def _conversation(*contents: str) -> list[dict]:
    """A system message, then user and assistant messages alternating: one per content, in order."""
    roles = ["system"] + ["user" if k % 2 == 0 else "assistant" for k in range(len(contents) - 1)]
    return [{"role": role, "content": content} for role, content in zip(roles, contents, strict=True)]


def test_sft_messages_system_and_two_turns(tokenizer):
    messages = _conversation("Answer briefly.", "What is 2 + 2?", "4.", "And 3 + 3?", "6.")
    (example,) = sft_examples([{"messages": messages}], tokenizer, 256)
    assert tokenizer.decode(example["input_ids"]) == (
        "### System:\nAnswer briefly.\n\n### User:\nWhat is 2 + 2?\n\n### Assistant:\n4.</s>"
        "### User:\nAnd 3 + 3?\n\n### Assistant:\n6.</s>"
    )
    _check_shifted(example["input_ids"], example["labels"])
    assert _labeled_spans(tokenizer, example["input_ids"], example["labels"]) == ["4.</s>", "6.</s>"]


def test_sft_chat_template(fresh_tokenizer, tokenizer):
    messages = _conversation("Be exact.", "What is 5 + 4?", "9.", "Double it.", "18.")
    with pytest.raises(ValueError, match="no chat template"):
        sft_examples([{"messages": messages}], fresh_tokenizer, 256, prompt_format="chat_template")

    # SOLAR's own template gives the solar format (eos appended, as the template writes none).
    fresh_tokenizer.chat_template = UPSTAGE_TEMPLATE
    from_template = sft_examples([{"messages": messages}], fresh_tokenizer, 256, prompt_format="chat_template")
    assert from_template == sft_examples([{"messages": messages}], tokenizer, 256)

    # A template that writes eos itself: the eos is trained once, not doubled.
    fresh_tokenizer.chat_template = TAGGED_TEMPLATE
    (example,) = sft_examples([{"messages": messages}], fresh_tokenizer, 256, prompt_format="chat_template")
    assert tokenizer.decode(example["input_ids"]) == (
        "<|system|>\nBe exact.</s><|user|>\nWhat is 5 + 4?</s><|assistant|>\n9.</s>"
        "<|user|>\nDouble it.</s><|assistant|>\n18.</s>"
    )
    _check_shifted(example["input_ids"], example["labels"])
    assert _labeled_spans(tokenizer, example["input_ids"], example["labels"]) == ["9.</s>", "18.</s>"]

    # Marks the last message: earlier turns render differently once a reply follows.
    fresh_tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="record 0.*chat template"):
        sft_examples([{"messages": messages}], fresh_tokenizer, 256, prompt_format="chat_template")


def test_sft_truncation_and_dropped_count(tokenizer, caplog):
    long_text = "the model reads a document and predicts the next token " * 10
    records = [
        {"prompt": "short question?", "response": long_text},  # kept, cut from the right
        {"prompt": long_text, "response": "lost"},  # prompt alone fills max_length: dropped
        {"prompt": "2 + 2?", "response": "4."},
    ]
    max_length = 32
    full = sft_examples(records[:1], tokenizer, 10_000)[0]
    with caplog.at_level(logging.WARNING, logger="training.data"):
        examples = sft_examples(records, tokenizer, max_length)
    assert "dropped 1 of 3" in caplog.text
    assert len(examples) == 2
    cut = examples[0]
    assert len(cut["input_ids"]) == max_length
    assert cut["input_ids"] == full["input_ids"][:max_length]
    assert cut["labels"][:-1] == full["labels"][: max_length - 1]
    _check_shifted(cut["input_ids"], cut["labels"])
    assert tokenizer.decode(examples[1]["input_ids"]).endswith("4.</s>")
    with pytest.raises(ValueError, match="no example left"):
        sft_examples(records[1:2], tokenizer, max_length)


def test_sft_field_names_and_errors(tokenizer):
    (renamed,) = sft_examples([{"q": "2 + 2?", "a": "4."}], tokenizer, 64, prompt_field="q", response_field="a")
    assert renamed == sft_examples([{"prompt": "2 + 2?", "response": "4."}], tokenizer, 64)[0]
    with pytest.raises(ValueError, match="record 1 has no 'response' field"):
        sft_examples([{"prompt": "a", "response": "b"}, {"prompt": "a"}], tokenizer, 64)
    with pytest.raises(ValueError, match="record 0 field 'response' is int"):
        sft_examples([{"prompt": "a", "response": 4}], tokenizer, 64)
    with pytest.raises(ValueError, match="record 0 field 'messages' message 0"):
        sft_examples([{"messages": [{"role": "bot", "content": "x"}]}], tokenizer, 64)
    with pytest.raises(ValueError, match="record 0 field 'messages' has roles.*ending with assistant"):
        sft_examples([{"messages": [{"role": "user", "content": "x"}]}], tokenizer, 64)
    with pytest.raises(ValueError, match="prompt_format"):
        sft_examples([{"prompt": "a", "response": "b"}], tokenizer, 64, prompt_format="alpaca")


def _llama_style(tokenizer):
    """The same tokenizer, adding bos on encode as Llama's and SOLAR's do."""
    from tokenizers import Tokenizer, processors

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def test_bos_when_the_tokenizer_adds_one(tokenizer):
    llama_style = _llama_style(tokenizer)
    bos = llama_style.bos_token_id
    record = {"prompt": "What is 7 + 8?", "response": "15."}
    (plain,) = sft_examples([record], tokenizer, 64)
    (with_bos,) = sft_examples([record], llama_style, 64)
    assert plain["input_ids"][0] != bos
    assert with_bos["input_ids"] == [bos] + plain["input_ids"]
    assert with_bos["labels"] == [IGNORE_INDEX] + plain["labels"]

    long_prompt = " ".join(f"word{k}" for k in range(40))
    pair = {"prompt": long_prompt, "chosen": "yes " * 40, "rejected": "no."}
    (example,) = dpo_examples([pair], llama_style, 40, 12)
    full_prompt = _encode(tokenizer, solar_prompt(long_prompt))
    # The bos stays in front of a prompt cut from the left.
    assert example["chosen_input_ids"][:12] == [bos] + full_prompt[-11:]
    assert len(example["chosen_input_ids"]) == 40


# ----------------------------------------------------------------------------- packing


def _toy_example(start, length):
    ids = list(range(start, start + length))
    return {"input_ids": ids, "labels": ids[1:] + [IGNORE_INDEX], "position_ids": list(range(length))}


def test_pack_examples_greedy_rows():
    lengths = [5, 7, 4, 9, 3, 20]
    examples = [_toy_example(100 * (k + 1), n) for k, n in enumerate(lengths)]
    rows = pack_examples(examples, 12, pad_id=3)
    # 5+7 | 4 (9 does not fit) | 9+3 | 20 cut to 12
    expected_rows = [[0, 1], [2], [3, 4], [5]]
    assert len(rows) == len(expected_rows)
    for row, members in zip(rows, expected_rows):
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == 12
        ids, labels, positions = [], [], []
        for k in members:
            example = examples[k]
            n = min(len(example["input_ids"]), 12)
            ids += example["input_ids"][:n]
            labels += example["labels"][: n - 1] + [IGNORE_INDEX]
            positions += list(range(n))
        pad = 12 - len(ids)
        assert row["input_ids"] == ids + [3] * pad
        assert row["labels"] == labels + [IGNORE_INDEX] * pad
        assert row["position_ids"] == positions + list(range(positions[-1] + 1, positions[-1] + 1 + pad))
        assert row["attention_mask"] == [1] * len(ids) + [0] * pad
        _check_shifted(row["input_ids"], row["labels"])
    assert packing_efficiency(rows) == (12 + 4 + 12 + 12) / 48
    padded = collate_lm(rows[1:2], pad_id=3)  # a packed row's padding stays out of the mask
    assert padded["attention_mask"].tolist() == [[1] * 4 + [0] * 8]


def test_pack_sft_examples_keeps_labels(tokenizer):
    records = [{"prompt": f"What is {a} + {a}?", "response": f"{2 * a}."} for a in range(10)]
    examples = sft_examples(records, tokenizer, 64)
    rows = pack_examples(examples, 64, pad_id=tokenizer.pad_token_id)
    assert len(rows) < len(examples)
    assert sum(sum(label != IGNORE_INDEX for label in r["labels"]) for r in rows) == sum(
        sum(label != IGNORE_INDEX for label in e["labels"]) for e in examples
    )
    assert sum(r["position_ids"].count(0) for r in rows) == len(examples)


# ----------------------------------------------------------------------------- DPO


def test_dpo_labels_only_on_responses(tokenizer):
    record = {"prompt": "What is 3 + 4?", "chosen": "3 + 4 = 7.", "rejected": "3 + 4 = 8."}
    (example,) = dpo_examples([record], tokenizer, 128, 64)
    prompt_ids = _encode(tokenizer, solar_prompt(record["prompt"]))
    for name in ("chosen", "rejected"):
        ids, labels = example[f"{name}_input_ids"], example[f"{name}_labels"]
        assert ids[: len(prompt_ids)] == prompt_ids
        _check_shifted(ids, labels)
        assert all(label == IGNORE_INDEX for label in labels[: len(prompt_ids) - 1])
        assert _labeled_spans(tokenizer, ids, labels) == [record[name] + "</s>"]
    assert set(example) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}


def test_dpo_truncation_rule(tokenizer):
    long_prompt = " ".join(f"word{k}" for k in range(60)) + " final question?"
    long_response = " ".join(f"step{k}" for k in range(60))
    record = {"prompt": long_prompt, "chosen": long_response, "rejected": "short."}
    max_length, max_prompt_length = 48, 20
    (example,) = dpo_examples([record], tokenizer, max_length, max_prompt_length)
    full_prompt = _encode(tokenizer, solar_prompt(long_prompt))
    full_chosen = _encode(tokenizer, long_response) + [tokenizer.eos_token_id]
    assert len(full_prompt) > max_prompt_length and len(full_chosen) > max_length
    # The prompt keeps its end (the question and the assistant header), the response its start.
    kept_prompt = full_prompt[-max_prompt_length:]
    assert example["chosen_input_ids"] == kept_prompt + full_chosen[: max_length - max_prompt_length]
    assert tokenizer.decode(kept_prompt).endswith("final question?\n\n### Assistant:\n")
    assert example["rejected_input_ids"] == full_prompt[-max_prompt_length:] + _encode(tokenizer, "short.") + [2]
    for name in ("chosen", "rejected"):
        assert len(example[f"{name}_input_ids"]) <= max_length
        labeled = [t for t, label in enumerate(example[f"{name}_labels"]) if label != IGNORE_INDEX]
        assert labeled[0] == max_prompt_length - 1

    # A long prompt is left whole when everything fits.
    (fits,) = dpo_examples([record | {"chosen": "ok."}], tokenizer, 10_000, max_prompt_length)
    assert fits["chosen_input_ids"][: len(full_prompt)] == full_prompt
    with pytest.raises(ValueError, match="max_prompt_length"):
        dpo_examples([record], tokenizer, 32, 32)


def test_dpo_message_formats(tokenizer):
    strings = {"prompt": "What is 1 + 1?", "chosen": "2.", "rejected": "3."}
    user = {"role": "user", "content": "What is 1 + 1?"}
    layouts = [
        {
            "prompt": [user],
            "chosen": {"role": "assistant", "content": "2."},
            "rejected": [{"role": "assistant", "content": "3."}],
        },
        # UltraFeedback-binarized: chosen and rejected repeat the prompt's messages.
        {
            "prompt": "What is 1 + 1?",
            "chosen": [user, {"role": "assistant", "content": "2."}],
            "rejected": [user, {"role": "assistant", "content": "3."}],
        },
    ]
    reference = dpo_examples([strings], tokenizer, 64, 32)
    for record in layouts:
        assert dpo_examples([record], tokenizer, 64, 32) == reference
    # A pair whose rejected equals its chosen is dropped (tests/training/test_data_safety.py).
    assert dpo_examples([strings | {"rejected": "2."}, strings], tokenizer, 64, 32) == reference

    with pytest.raises(ValueError, match="record 1 has no 'rejected' field"):
        dpo_examples([strings, {"prompt": "a", "chosen": "b"}], tokenizer, 64, 32)
    with pytest.raises(ValueError, match="record 0 field 'chosen'.*exactly one assistant"):
        two = [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
        dpo_examples([strings | {"chosen": two}], tokenizer, 64, 32)
    with pytest.raises(ValueError, match="record 0 field 'prompt' has roles"):
        dpo_examples([strings | {"prompt": [user, {"role": "assistant", "content": "2."}]}], tokenizer, 64, 32)


def test_dpo_chat_template(fresh_tokenizer, tokenizer):
    record = {"prompt": "What is 1 + 1?", "chosen": "2.", "rejected": "3."}
    fresh_tokenizer.chat_template = UPSTAGE_TEMPLATE
    assert dpo_examples([record], fresh_tokenizer, 64, 32, prompt_format="chat_template") == dpo_examples(
        [record], tokenizer, 64, 32
    )


# ----------------------------------------------------------------------------- collate


def test_collate_lm_pads_right():
    examples = [_toy_example(10, 3), _toy_example(20, 5)]
    examples[1]["position_ids"] = [0, 1, 0, 1, 2]  # packed: positions restart
    batch = collate_lm(examples, pad_id=3)
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask"}
    for value in batch.values():
        assert value.shape == (2, 5) and value.dtype == torch.long
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["input_ids"].tolist() == [[10, 11, 12, 3, 3], [20, 21, 22, 23, 24]]
    assert batch["labels"].tolist() == [[11, 12, -100, -100, -100], [21, 22, 23, 24, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 1, 2]]
    assert num_tokens(batch) == 6
    with pytest.raises(ValueError, match="example 0 has 3 input_ids and 2 labels"):
        collate_lm([{"input_ids": [1, 2, 3], "labels": [2, 3]}], pad_id=3)


def test_collate_dpo_chosen_then_rejected(tokenizer):
    records = [
        {"prompt": "What is 1 + 1?", "chosen": "2.", "rejected": "It is three, I think."},
        {"prompt": "What is 2 + 2?", "chosen": "4, since two and two make four.", "rejected": "5."},
        {"prompt": "What is 3 + 3?", "chosen": "6.", "rejected": "7."},
    ]
    examples = dpo_examples(records, tokenizer, 128, 64)
    batch = collate_dpo(examples, pad_id=tokenizer.pad_token_id)
    longest = max(len(e[f"{n}_input_ids"]) for e in examples for n in ("chosen", "rejected"))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (6, longest)
    for row in range(6):
        name, example = ("chosen", examples[row]) if row < 3 else ("rejected", examples[row - 3])
        ids, labels = example[f"{name}_input_ids"], example[f"{name}_labels"]
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids
        assert batch["labels"][row, :n].tolist() == labels
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["position_ids"][row].tolist() == list(range(longest))
    labels = [label for e in examples for n in ("chosen", "rejected") for label in e[f"{n}_labels"]]
    assert num_tokens(batch) == sum(label != IGNORE_INDEX for label in labels)


# ----------------------------------------------------------------------------- BatchStream


def _id_examples(n):
    return [{"input_ids": [i, i], "labels": [i, IGNORE_INDEX]} for i in range(n)]


_collate_ids = functools.partial(collate_lm, pad_id=0)


def _ids(batch):
    return batch["input_ids"][:, 0].tolist()


def _take(stream, k):
    iterator = iter(stream)
    return [_ids(next(iterator)) for _ in range(k)]


def test_batch_stream_deterministic_epochs():
    examples = _id_examples(12)
    first = _take(BatchStream(examples, 4, _collate_ids, seed=7), 9)
    assert first == _take(BatchStream(examples, 4, _collate_ids, seed=7), 9)
    assert first != _take(BatchStream(examples, 4, _collate_ids, seed=8), 9)
    epochs = [sum(first[3 * e : 3 * e + 3], []) for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(12))  # each epoch visits every example once
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled each epoch
    ordered = _take(BatchStream(examples, 4, _collate_ids, seed=7, shuffle=False), 4)
    assert ordered == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [0, 1, 2, 3]]


@pytest.mark.parametrize("taken", [2, 3, 4, 7])  # mid-epoch, at an epoch boundary, past it
def test_batch_stream_resume(taken):
    examples = _id_examples(14)  # 3 batches of 4 per epoch, 2 examples dropped
    reference = BatchStream(examples, 4, _collate_ids, seed=3)
    iterator = iter(reference)
    for _ in range(taken):
        next(iterator)
    state = reference.state_dict()
    assert state == {"epoch": taken // 3, "index": taken % 3}
    following = [_ids(next(iterator)) for _ in range(5)]

    resumed = BatchStream(examples, 4, _collate_ids, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert _take(resumed, 5) == following
    with pytest.raises(ValueError, match="load_state_dict"):
        resumed.load_state_dict({"epoch": 0, "index": 3})


def test_batch_stream_ranks_split_the_global_batch():
    examples = _id_examples(20)
    single = _take(BatchStream(examples, 4, _collate_ids, seed=1), 12)
    ranks = [_take(BatchStream(examples, 2, _collate_ids, seed=1, rank=r, world_size=2), 12) for r in range(2)]
    for step in range(12):
        assert ranks[0][step] + ranks[1][step] == single[step]
    assert ranks[0] != ranks[1]


def test_batch_stream_keep_last_and_errors():
    examples = _id_examples(10)
    stream = BatchStream(examples, 4, _collate_ids, seed=0, drop_last=False)
    assert stream.batches_per_epoch == 3
    batches = _take(stream, 3)
    assert all(len(batch) == 4 for batch in batches)
    epoch = sum(batches, [])
    assert set(epoch) == set(range(10)) and epoch[10:] == epoch[:2]  # the last batch wraps to the start
    with pytest.raises(ValueError, match="no examples"):
        BatchStream([], 4, _collate_ids, seed=0)
    with pytest.raises(ValueError, match="cannot fill one global batch of 16"):
        BatchStream(examples, 8, _collate_ids, seed=0, world_size=2)


# ----------------------------------------------------------------------------- held-out split


def test_split_records_holds_out_a_seeded_share_disjoint_from_training(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)))
    records = load_records(path)
    train, held_out = split_records(records, 0.2, seed=0)
    train_texts, held_texts = [r["text"] for r in train], [r["text"] for r in held_out]
    assert len(held_texts) == 10 and len(train_texts) == 40
    assert not set(train_texts) & set(held_texts) and sorted(train_texts + held_texts) == sorted(records["text"])
    assert train_texts == [t for t in records["text"] if t not in held_texts]  # the records' order is kept
    assert [r["text"] for r in split_records(records, 0.2, seed=0)[1]] == held_texts  # fixed by the seed
    assert [r["text"] for r in split_records(records, 0.2, seed=1)[1]] != held_texts
    assert split_records(list(range(7)), 0.01, seed=0)[1] != []  # at least one row is held out
    with pytest.raises(ValueError, match="holding out 0.9 of 2 records leaves 0 to train on"):
        split_records([1, 2], 0.9, seed=0)


# ----------------------------------------------------------------------------- packing strategies

TRL_PACKING = json.loads((Path(__file__).parents[1] / "fixtures" / "trl" / "token_metrics.json").read_text())["packing"]


def _real(row):
    return [token for token, keep in zip(row["input_ids"], row["attention_mask"]) if keep]


def _examples_of(sequences):
    return [{"input_ids": ids, "labels": ids[1:] + [IGNORE_INDEX]} for ids in sequences]


@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
def test_packing_strategies_match_trl(strategy):
    # TRL 1.16's pack_dataset on the same token lists (tests/fixtures/trl/token_metrics.py)
    seq_len, sequences = TRL_PACKING["seq_length"], TRL_PACKING["sequences"]
    rows = pack_examples(_examples_of(sequences), seq_len, pad_id=-1, strategy=strategy)
    assert [_real(row) for row in rows] == TRL_PACKING[strategy]
    starts = {ids[0] for ids in sequences}
    for row in rows:
        real = _real(row)
        assert len(row["input_ids"]) == seq_len
        # positions restart at every document start and at a row's start (a wrapped document's continuation)
        restarts = [t for t, p in zip(real, row["position_ids"]) if p == 0]
        assert restarts == [real[0]] + [t for t in real[1:] if t in starts]
        _check_shifted(row["input_ids"], row["labels"])


def test_bfd_fills_rows_better_than_greedy_and_never_splits():
    lengths = [6, 5, 4, 5]  # greedy in order: [6] [5 4] [5]; best fit decreasing: [6 4] [5 5]
    starts = [0, 100, 200, 300]
    examples = [_toy_example(start, n) for start, n in zip(starts, lengths)]
    greedy = pack_examples(examples, 10, pad_id=0, strategy="greedy")
    bfd = pack_examples(examples, 10, pad_id=0, strategy="bfd")
    assert [len(_real(row)) for row in greedy] == [6, 9, 5] and packing_efficiency(greedy) == 20 / 30
    assert [_real(row) for row in bfd] == [
        examples[0]["input_ids"] + examples[2]["input_ids"],
        examples[1]["input_ids"] + examples[3]["input_ids"],
    ]
    assert packing_efficiency(bfd) == 1.0
    # every example whole, once, with its labels, and fewer rows than greedy on a bigger mix
    mixed = [_toy_example(1000 * k, n) for k, n in enumerate([9, 2, 7, 3, 8, 1, 5, 6, 4, 4, 2, 9])]
    rows = pack_examples(mixed, 12, pad_id=0, strategy="bfd")
    pieces = sorted(tuple(row["input_ids"][a:b]) for row in rows for a, b in _documents(row))
    assert pieces == sorted(tuple(e["input_ids"]) for e in mixed)
    assert len(rows) < len(pack_examples(mixed, 12, pad_id=0, strategy="greedy"))
    with pytest.raises(ValueError, match="strategy='first_fit', expected one of greedy, bfd, wrapped"):
        pack_examples(mixed, 12, pad_id=0, strategy="first_fit")


def _documents(row):
    """(start, end) of each packed document of a row, from its position restarts and mask."""
    n = sum(row["attention_mask"])
    starts = [t for t in range(n) if row["position_ids"][t] == 0]
    return list(zip(starts, starts[1:] + [n]))


def test_sft_completion_only_switch(tokenizer):
    records = [{"prompt": "What is 2 + 3?", "response": "5."}]
    (answers,) = sft_examples(records, tokenizer, 128)
    (everything,) = sft_examples(records, tokenizer, 128, completion_only=False)
    assert answers["input_ids"] == everything["input_ids"]
    prompt = len(_encode(tokenizer, solar_prompt(records[0]["prompt"])))
    trained = [label != IGNORE_INDEX for label in answers["labels"]]
    assert trained.index(True) >= prompt - 1 and sum(trained) == len(_encode(tokenizer, "5.")) + 1  # answer and eos
    assert everything["labels"] == everything["input_ids"][1:] + [IGNORE_INDEX]  # every next token, prompt included
