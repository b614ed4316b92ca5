"""The lm-evaluation-harness ``solar`` model (solar_kernels/lm_eval_adapter.py) on a tiny converted
GGUF model: a local multiple-choice task (tests/fixtures/lm_eval/) through ``simple_evaluate`` and
through the command line, against log-likelihoods computed here from our model's full logits;
rolling log-likelihoods against transformers; ``generate_until`` against ``model.generate``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="the tiny test model is written as a GGUF file (pip install gguf)")
pytest.importorskip("transformers", reason="the tokenizer loads through transformers")
lm_eval = pytest.importorskip("lm_eval", reason="the adapter needs lm-eval (pip install 'solar_kernels[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from solar_kernels.lm_eval_adapter import SolarLM  # noqa: E402
from solar_kernels.model import generate  # noqa: E402
from tests.helpers import tiny_checkpoint  # noqa: E402

TASKS = Path(__file__).parent / "fixtures" / "lm_eval"
REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The checkpoint folder and the adapter's model of it."""
    path = tiny_checkpoint(tmp_path_factory.mktemp("lm_eval"))
    return path, SolarLM(pretrained=str(path), device="cpu", backend="triton", batch_size=3)


def _direct_logprob(lm: SolarLM, context: str, continuation: str) -> float:
    """log p(continuation | context) from the model's full logits, split as the harness splits."""
    whole = lm.tok_encode(context + continuation)
    start = len(lm.tok_encode(context))
    with torch.no_grad():
        logprobs = lm.model(torch.tensor([whole])).float().log_softmax(-1)[0]  # [T, V]
    return sum(float(logprobs[t - 1, whole[t]]) for t in range(start, len(whole)))


def _expected_accuracy(lm: SolarLM) -> tuple[float, list[list[float]]]:
    docs = [json.loads(line) for line in (TASKS / "solar_tiny_mc.jsonl").read_text().splitlines()]
    scores = [[_direct_logprob(lm, doc["question"], " " + choice) for choice in doc["choices"]] for doc in docs]
    right = [max(range(len(s)), key=s.__getitem__) == doc["label"] for s, doc in zip(scores, docs)]
    return sum(right) / len(docs), scores


def test_multiple_choice_task_through_simple_evaluate(tiny, monkeypatch):
    path, lm = tiny
    monkeypatch.chdir(TASKS)  # the task's data file is relative to the working directory
    results = lm_eval.simple_evaluate(
        model="solar",
        model_args=f"pretrained={path},backend=triton,batch_size=4",
        tasks=["solar_tiny_mc"],
        task_manager=TaskManager(include_path=str(TASKS)),
        log_samples=True,
        bootstrap_iters=0,
    )
    accuracy, scores = _expected_accuracy(lm)
    assert 0 < accuracy < 1, "the fixture should have both right and wrong answers for this model"
    assert results["results"]["solar_tiny_mc"]["acc,none"] == pytest.approx(accuracy, abs=1e-12)
    for sample in sorted(results["samples"]["solar_tiny_mc"], key=lambda s: s["doc_id"]):
        got = [float(response[0]) for response in sample["filtered_resps"]]
        assert got == pytest.approx(scores[sample["doc_id"]], rel=1e-4, abs=1e-4)


def test_command_line_registers_solar(tiny, tmp_path):
    path, lm = tiny
    out = tmp_path / "results"
    command = [
        sys.executable,
        "-m",
        "solar_kernels.lm_eval_adapter",
        "run",
        "--model",
        "solar",
        "--model_args",
        f"pretrained={path},backend=torch",
        "--tasks",
        "solar_tiny_mc",
        "--include_path",
        str(TASKS),
        "--output_path",
        str(out),
        "--device",
        "cpu",
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    finished = subprocess.run(command, cwd=TASKS, env=environment, capture_output=True, text=True, timeout=540)
    assert finished.returncode == 0, finished.stderr[-3000:]
    [written] = list(out.rglob("results_*.json"))
    accuracy, _ = _expected_accuracy(lm)
    assert json.loads(written.read_text())["results"]["solar_tiny_mc"]["acc,none"] == pytest.approx(accuracy, abs=1e-12)


def test_loglikelihood_is_greedy_and_empty_context(tiny):
    _, lm = tiny
    context = "The capital of France is"
    greedy = generate(lm.model, [lm.tok_encode(context)], 3, eos_token_id=-1)[0]
    greedy_text = lm.tok_decode(greedy)
    requests = [
        Instance("loglikelihood", {}, (context, greedy_text), 0),
        Instance("loglikelihood", {}, (context, " Rome and Paris"), 1),
        Instance("loglikelihood", {}, ("", "Paris"), 2),
    ]
    (greedy_lp, is_greedy), (_, other_greedy), (empty_lp, _) = lm.loglikelihood(requests)
    assert lm.tok_encode(context + greedy_text)[len(lm.tok_encode(context)) :] == greedy, "needs a stable split"
    assert is_greedy and not other_greedy
    assert greedy_lp == pytest.approx(_direct_logprob(lm, context, greedy_text), rel=1e-4)
    with torch.no_grad():  # an empty context is the prefix token (bos of this tokenizer, id 1)
        ids = [lm.prefix_token_id, *lm.tok_encode("Paris")]
        logprobs = lm.model(torch.tensor([ids])).float().log_softmax(-1)[0]
    assert empty_lp == pytest.approx(sum(float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))), rel=1e-4)


@pytest.mark.parametrize("max_length", [8, 256])
def test_loglikelihood_rolling_equals_transformers(tiny, max_length):
    from transformers import LlamaForCausalLM

    path, lm = tiny
    hf_model = LlamaForCausalLM.from_pretrained(path, trust_remote_code=False).float().eval()
    rolling = SolarLM(pretrained=str(path), device="cpu", backend="triton", batch_size=2, max_length=max_length)
    texts = ["There are 1234 apples and 56 pears in the basket, 7 of them are red.", "Hello"]
    got = rolling.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]
    )
    for text, value in zip(texts, got):
        tokens = rolling.tok_encode(text)
        expected = 0.0
        windows = list(
            map(make_disjoint_window, get_rolling_token_windows(tokens, rolling.prefix_token_id, max_length, 1))
        )
        assert (len(windows) > 1) == (max_length == 8 and len(tokens) > 8)
        for context, predicted in windows:
            ids = torch.tensor([context + predicted])
            with torch.no_grad():
                logprobs = hf_model(input_ids=ids).logits.float().log_softmax(-1)[0]
            expected += sum(float(logprobs[t - 1, ids[0, t]]) for t in range(len(context), ids.shape[1]))
        assert value == pytest.approx(expected, rel=1e-4)


def test_generate_until_stops_before_the_stop_string(tiny):
    _, lm = tiny
    contexts = ["The capital of France is", "Numbers:"]
    full = [
        lm.tok_decode(generate(lm.model, [lm.tok_encode(c)], 12, eos_token_id=lm.eot_token_id)[0]) for c in contexts
    ]
    stop = full[0][len(full[0]) // 2 :][:2]  # two characters from the middle of the first reply
    assert stop.strip(), full
    requests = [
        Instance("generate_until", {}, (c, {"until": [stop], "max_gen_toks": 12}), i) for i, c in enumerate(contexts)
    ]
    got = lm.generate_until(requests)
    assert got == [text.split(stop, 1)[0] for text in full]
    assert len(got[0]) < len(full[0])
    # The default stop is the eos text; a shorter max_gen_toks is honoured.
    [short] = lm.generate_until([Instance("generate_until", {}, (contexts[1], {"max_gen_toks": 3}), 0)])
    assert short == lm.tok_decode([t for t in generate(lm.model, [lm.tok_encode(contexts[1])], 3)[0] if t != 2])


def test_bad_model_arguments_are_one_line_errors(tiny):
    path, _ = tiny
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 'auto'"):
        SolarLM(pretrained=str(path), batch_size="auto")
    with pytest.raises(ValueError, match="no such|not a directory|does not exist"):
        SolarLM(pretrained=str(path / "missing"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda:0', but torch sees no CUDA device; pass --device cpu"):
            SolarLM(pretrained=str(path), device="cuda:0")
