"""``solar eval`` (solar_kernels/evaluate.py) on a tiny converted GGUF model, against transformers'
``LlamaForCausalLM`` loaded from the same folder."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

pytest.importorskip("gguf", reason="the tiny test model is written as a GGUF file (pip install gguf)")
pytest.importorskip("transformers", reason="the tokenizer loads through transformers")
pytest.importorskip("datasets", reason="solar eval reads --text through datasets")

from solar_kernels import evaluate  # noqa: E402
from solar_kernels.cli import build_parser  # noqa: E402
from solar_kernels.model import hf as model_hf  # noqa: E402
from tests.helpers import tiny_checkpoint  # noqa: E402

DOCUMENTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "There are 1234 apples in the basket; 7 of them are red and 56 are green.",
    "Hello, world! A tiny model reads a tiny held-out text of 2024 words.",
    "Numbers: 3.14, 100%, 09:45. The end.",
]
PAIRS = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " a basket of pears."},
    {"prompt": "Numbers:", "chosen": " 2024, 3.14", "rejected": " hello hello hello"},
    {"prompt": "There are", "chosen": " 1234 apples", "rejected": " 56 pears and 7 red ones in it"},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The checkpoint folder, its tokenizer and transformers' model of it (fp32, eval)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = tiny_checkpoint(tmp_path_factory.mktemp("eval"))
    return (
        path,
        AutoTokenizer.from_pretrained(path, trust_remote_code=False),
        LlamaForCausalLM.from_pretrained(path, trust_remote_code=False).float().eval(),
    )


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["eval", *argv])


def _run(argv: list[str], out_path) -> dict:
    assert evaluate.run(_parse([*argv, "--out", str(out_path), "--backend", "triton"])) == 0
    return json.loads(out_path.read_text())


def _hf_window_loss(hf_model, windows: list[list[int]]) -> tuple[float, int]:
    """Token-weighted mean of transformers' own ``labels=`` loss over the windows."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window])
            loss = hf_model(input_ids=ids, labels=ids).loss  # mean over the len - 1 shifted tokens
            total += float(loss) * (len(window) - 1)
            count += len(window) - 1
    return total / count, count


def _hf_continuation_logprob(hf_model, context: list[int], continuation: list[int]) -> float:
    with torch.no_grad():
        ids = torch.tensor([context + continuation])
        logprobs = hf_model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    picked = logprobs.gather(-1, targets[:, None])[:, 0]
    return float(picked[len(context) - 1 :].sum())


def test_loss_equals_transformers_labels_loss_over_the_same_windows(tiny, tmp_path):
    path, tokenizer, hf_model = tiny
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"body": text, "id": i}) + "\n" for i, text in enumerate(DOCUMENTS)))
    result = _run(
        [str(path), "--text", str(data), "--text-field", "body", "--seq-len", "16", "--batch-size", "3"],
        tmp_path / "result.json",
    )
    # each document (and its eos) in windows of its own: none crosses into the next document
    documents = [tokenizer(text, add_special_tokens=False).input_ids + [2] for text in DOCUMENTS]
    windows = [doc[i : i + 16] for doc in documents for i in range(0, len(doc), 16)]
    assert any(len(doc) > 16 for doc in documents), "a document should need more than one window"
    assert all(len(w) >= 2 for w in windows) and len({len(w) for w in windows}) > 1
    loss, count = _hf_window_loss(hf_model, windows)
    assert result["tokens"] == count == sum(map(len, documents)) - len(windows)  # each window's first token: context
    assert result["loss"] == pytest.approx(loss, rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert result["checkpoint"] == str(path) and result["pairs"] is None and result["seconds"] > 0


def test_text_folder_of_txt_documents_with_max_tokens(tiny, tmp_path):
    path, tokenizer, hf_model = tiny
    folder = tmp_path / "texts"
    (folder / "more").mkdir(parents=True)
    (folder / "a.txt").write_text(DOCUMENTS[0] + "\n" + DOCUMENTS[1])  # one file, one document
    (folder / "more" / "b.txt").write_text(DOCUMENTS[2])
    (folder / "notes.md").write_text("not a text file of the dataset")
    result = _run([str(path), "--text", str(folder), "--seq-len", "8", "--max-tokens", "90"], tmp_path / "r.json")
    texts = [DOCUMENTS[0] + "\n" + DOCUMENTS[1], DOCUMENTS[2]]
    documents = [tokenizer(text, add_special_tokens=False).input_ids + [2] for text in texts]
    first, second = documents[0], documents[1][: 90 - len(documents[0])]  # 90 tokens in all, the last document cut
    assert len(first) < 90 and 2 <= len(second) < len(documents[1])
    windows = [doc[i : i + 8] for doc in (first, second) for i in range(0, len(doc), 8)]
    windows = [w for w in windows if len(w) >= 2]
    loss, count = _hf_window_loss(hf_model, windows)
    assert result["tokens"] == count == sum(len(w) - 1 for w in windows)
    assert result["loss"] == pytest.approx(loss, rel=1e-4)


def test_preference_accuracy_and_margin_equal_transformers_log_probs(tiny, tmp_path):
    path, tokenizer, hf_model = tiny
    # Each pair and its mirror: exactly one of the two is right, whatever the model (no ties here).
    pairs = PAIRS + [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in PAIRS[:2]]
    file = tmp_path / "pairs.jsonl"
    file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    result = _run([str(path), "--pairs", str(file), "--batch-size", "2"], tmp_path / "r.json")
    margins = []
    for pair in pairs:
        context = tokenizer(pair["prompt"]).input_ids
        chosen, rejected = (
            _hf_continuation_logprob(hf_model, context, tokenizer(pair[k], add_special_tokens=False).input_ids)
            for k in ("chosen", "rejected")
        )
        margins.append(chosen - rejected)
    assert all(abs(m) > 1e-3 for m in margins)
    assert result["pairs"] == 5 and result["loss"] is None
    assert result["preference_accuracy"] == sum(m > 0 for m in margins) / 5
    assert sum(m > 0 for m in margins[:2] + margins[3:]) == 2  # the mirrored pairs: one right, one wrong
    assert result["reward_margin"] == pytest.approx(sum(margins) / 5, rel=1e-4, abs=1e-4)
    # the per-pair margins behind both numbers (what solar demo compares against the SFT model's)
    model = model_hf.load_pretrained(path, dtype=torch.float32).eval()
    ours = evaluate.preference_margins(model, evaluate.preference_requests(tokenizer, pairs), batch_size=2)
    assert ours == pytest.approx(margins, rel=1e-4, abs=1e-4)


def test_chat_puts_prompts_under_the_chat_template(tiny, tmp_path):
    path, tokenizer, hf_model = tiny
    file = tmp_path / "pairs.jsonl"
    file.write_text(json.dumps(PAIRS[0]) + "\n")
    plain = _run([str(path), "--pairs", str(file)], tmp_path / "plain.json")
    chat = _run([str(path), "--pairs", str(file), "--chat"], tmp_path / "chat.json")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PAIRS[0]["prompt"]}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n")
    context = tokenizer(text, add_special_tokens=False).input_ids
    margin = -_hf_continuation_logprob(
        hf_model, context, tokenizer(PAIRS[0]["rejected"], add_special_tokens=False).input_ids
    )
    margin += _hf_continuation_logprob(
        hf_model, context, tokenizer(PAIRS[0]["chosen"], add_special_tokens=False).input_ids
    )
    assert chat["reward_margin"] == pytest.approx(margin, rel=1e-4, abs=1e-4)
    assert abs(chat["reward_margin"] - plain["reward_margin"]) > 1e-3


def test_existing_out_is_kept_without_force_and_replaced_with_it(tiny, tmp_path, capsys):
    path, _, _ = tiny
    data = tmp_path / "a.txt"
    data.write_text(DOCUMENTS[0])
    out = tmp_path / "result.json"
    out.write_text("the user's file")
    assert evaluate.run(_parse([str(path), "--text", str(data), "--out", str(out)])) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "the user's file"
    assert evaluate.run(_parse([str(path), "--text", str(data), "--out", str(out), "--force", "--seq-len", "8"])) == 0
    assert json.loads(out.read_text())["seq_len"] == 8
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "nothing to evaluate"),
        (["--text", "{tmp}/missing.jsonl"], "no such file or folder"),
        (["--text", "{tmp}/data.csv"], "unsupported file type '.csv'"),
        (["--text", "{tmp}/empty_dir"], "holds no .txt/.jsonl/.json/.parquet file"),
        (["--text", "{tmp}/rows.jsonl", "--text-field", "content"], "no field 'content'"),
        (["--text", "{tmp}/rows.jsonl", "--seq-len", "1"], "--seq-len must be >= 2"),
        (["--pairs", "{tmp}/bad_pairs.jsonl"], "line 2 is {'prompt': 'str', 'chosen': 'int'}"),
        (["--pairs", "{tmp}/broken.jsonl"], "line 1 is not JSON"),
        (["--pairs", "{tmp}/rows.jsonl", "--out", "{tmp}/no/such/dir/r.json"], "does not exist"),
        (["--pairs", "{tmp}/rows.jsonl", "--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_bad_input_is_one_line_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch, argv, message):
    path, _, _ = tiny
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "bad_pairs.jsonl").write_text(
        json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "a", "chosen": 1}) + "\n"
    )
    (tmp_path / "broken.jsonl").write_text("{not json\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(model_hf, "load_pretrained", no_model)
    assert evaluate.run(_parse([str(path), *(a.format(tmp=tmp_path) for a in argv)])) == 2
    err = capsys.readouterr().err
    assert err.startswith("solar eval: error: ") and err.count("\n") == 1 and message in err, err


def test_chat_without_a_template_is_refused_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch):
    import shutil

    path, _, _ = tiny
    copy = tmp_path / "no_template"
    shutil.copytree(path, copy)
    config_file = copy / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (copy / name).unlink(missing_ok=True)
    (tmp_path / "pairs.jsonl").write_text(json.dumps(PAIRS[0]) + "\n")
    monkeypatch.setattr(model_hf, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    assert evaluate.run(_parse([str(copy), "--pairs", str(tmp_path / "pairs.jsonl"), "--chat"])) == 2
    assert "no chat template" in capsys.readouterr().err


def test_windows_cut_each_document_and_drop_a_single_token():
    documents = [[5, 6, 7], [8, 9]]
    assert evaluate.token_windows(documents, 3, 2) == [[5, 6, 7], [8, 9, 2]]  # the first's lone eos scores nothing
    assert evaluate.token_windows(documents, 4, 2) == [[5, 6, 7, 2], [8, 9, 2]]
    assert evaluate.token_windows(documents, 4, None, max_tokens=5) == [[5, 6, 7], [8, 9]]
    assert evaluate.token_windows(documents, 4, None, max_tokens=4) == [[5, 6, 7]]  # [8] alone scores nothing
    assert evaluate.token_windows(documents, 2, 2, max_tokens=5) == [[5, 6], [7, 2]]  # the second cut to [8]


def test_parquet_and_json_array_read_like_jsonl(tiny, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, _, _ = tiny
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCUMENTS))
    (tmp_path / "rows.json").write_text(json.dumps([{"text": t} for t in DOCUMENTS]))
    pq.write_table(pa.table({"text": DOCUMENTS}), tmp_path / "rows.parquet")
    results = [
        _run([str(path), "--text", str(tmp_path / f"rows.{kind}"), "--seq-len", "16"], tmp_path / f"{kind}.out")
        for kind in ("jsonl", "json", "parquet")
    ]
    assert results[0]["tokens"] > 0
    assert [(r["loss"], r["tokens"]) for r in results[1:]] == [(results[0]["loss"], results[0]["tokens"])] * 2


def test_max_tokens_stops_the_tokenizing():
    calls = []

    class Tokenizer:
        def __call__(self, texts, add_special_tokens, split_special_tokens):
            calls.append(list(texts))
            return argparse.Namespace(input_ids=[[7, 8, 9] for _ in texts])

    windows = evaluate.token_windows(
        evaluate.encoded_documents(Tokenizer(), ["a"] * 1000, batch_size=2), 4, 2, max_tokens=6
    )
    assert windows == [[7, 8, 9, 2], [7, 8]] and calls == [["a", "a"]]
