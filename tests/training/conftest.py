from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A tokenizer trained on a slice of the standard library's docstrings, and small data files."""
    from training import demo_data
    from training.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("training")
    corpus = demo_data.stdlib_corpus(300)
    train_bpe_tokenizer(corpus, 320, root / "tokenizer")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_data.math_sft_records(64, 0)))
    pairs = demo_data.math_preference_records(48, 1)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (root / "easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs if r["difficulty"] == 1))
    (root / "hard.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs if r["difficulty"] > 1))
    return root
