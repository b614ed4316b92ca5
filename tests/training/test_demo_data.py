"""Tests of training/demo_data.py: the stdlib corpus and the generated math problems.

Every generated answer is checked against an independent evaluation of its problem: the prompt is
parsed back into numbers and the arithmetic is redone here.
"""

from __future__ import annotations

import ast
import operator
import re
import sysconfig
import time

import pytest

from training.demo_data import (
    extract_answer,
    math_preference_records,
    math_sft_records,
    split_held_out,
    stdlib_corpus,
)

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_EQUATION = re.compile(r"(\d+) ([-+*]) (\d+) = (-?\d+)")


def _evaluate(expression: str) -> int:
    """An arithmetic expression of integers, + - * and parentheses, evaluated without eval()."""

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise AssertionError(f"unexpected expression {expression!r}")

    return walk(ast.parse(expression, mode="eval").body)


def _expected_answer(prompt: str) -> int:
    """The answer of a generated problem, read from its prompt alone."""
    if match := re.fullmatch(r"What is ([-+*() \d]+)\?", prompt):
        return _evaluate(match.group(1))
    if match := re.fullmatch(r"\w+ has (\d+) (\w+) and gets (\d+) more\. How many \2 does \w+ have now\?", prompt):
        return int(match.group(1)) + int(match.group(3))
    if match := re.fullmatch(r"\w+ has (\d+) (\w+) and gives away (\d+)\. How many \2 does \w+ have left\?", prompt):
        return int(match.group(1)) - int(match.group(3))
    if match := re.fullmatch(
        r"\w+ has (\d+) (\w+) and buys (\d+) \w+ of (\d+) \2\. How many \2 does \w+ have\?", prompt
    ):
        return int(match.group(1)) + int(match.group(3)) * int(match.group(4))
    if match := re.fullmatch(
        r"\w+ has (\d+) (\w+) and gives each of (\d+) friends (\d+) \2\. How many \2 does \w+ have left\?", prompt
    ):
        return int(match.group(1)) - int(match.group(3)) * int(match.group(4))
    raise AssertionError(f"a problem of unknown form: {prompt!r}")


def _equations_hold(work: str) -> list[bool]:
    found = _EQUATION.findall(work)
    assert found, work
    apply = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    return [apply[op](int(a), int(b)) == int(c) for a, op, b, c in found]


def _check_final_line(text: str, answer: int) -> None:
    assert text.splitlines()[-1] == f"The answer is {answer}."
    assert extract_answer(text) == answer


# ----------------------------------------------------------------------------- math SFT


def test_math_sft_records_are_correct():
    records = math_sft_records(400, seed=0)
    assert len(records) == 400
    assert len({r["prompt"] for r in records}) == 400
    assert {r["difficulty"] for r in records} == {1, 2}
    for record in records:
        assert set(record) == {"prompt", "response", "answer", "difficulty"}
        assert record["answer"] == _expected_answer(record["prompt"]) >= 0
        _check_final_line(record["response"], record["answer"])
        assert all(_equations_hold(record["response"]))
        # The number of worked operations is the difficulty.
        assert len(_EQUATION.findall(record["response"])) == record["difficulty"]
        assert max(int(n) for n in re.findall(r"\d+", record["prompt"])) <= 99


def test_math_records_are_deterministic():
    assert math_sft_records(50, seed=3) == math_sft_records(50, seed=3)
    assert math_sft_records(50, seed=3) != math_sft_records(50, seed=4)
    assert math_preference_records(50, seed=3) == math_preference_records(50, seed=3)
    assert math_preference_records(50, seed=3) != math_preference_records(50, seed=4)
    assert math_sft_records(0, seed=0) == []
    with pytest.raises(ValueError, match="n=-1"):
        math_sft_records(-1, seed=0)


def test_all_problem_forms_appear():
    prompts = [r["prompt"] for r in math_sft_records(200, seed=1)]
    forms = [
        r"^What is \d+ \+ \d+\?$",
        r"^What is \d+ - \d+\?$",
        r"^What is \d+ \* \d+\?$",
        r"gets \d+ more",
        r"gives away",
        r"buys",
        r"gives each",
        r"^What is \d+ \+ \d+ - \d+\?$",
        r"^What is \(\d+ \+ \d+\) \* \d+\?$",
    ]
    for form in forms:
        assert any(re.search(form, p) for p in prompts), form


# ----------------------------------------------------------------------------- math preferences


def test_math_preference_records():
    records = math_preference_records(300, seed=0)
    assert len({r["prompt"] for r in records}) == 300
    assert {r["difficulty"] for r in records} == {1, 2}
    for record in records:
        assert set(record) == {"prompt", "chosen", "rejected", "answer", "difficulty"}
        answer = _expected_answer(record["prompt"])
        assert record["answer"] == answer
        _check_final_line(record["chosen"], answer)
        assert all(_equations_hold(record["chosen"]))
        wrong = extract_answer(record["rejected"])
        assert wrong is not None and wrong != answer and wrong >= 0
        assert record["rejected"].splitlines()[-1] == f"The answer is {wrong}."
        # Exactly one step is wrong; the steps after it compute correctly from the wrong value.
        assert _equations_hold(record["rejected"]).count(False) == 1
        steps = record["difficulty"]
        assert len(_EQUATION.findall(record["rejected"])) == len(_EQUATION.findall(record["chosen"])) == steps


# ----------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3 + 4 = 7.\nThe answer is 7.", 7),
        ("... so the answer is 33.", 33),
        ("THE ANSWER IS -4", -4),
        ("The answer is 12.\n### User:\nWhat is 1 + 1?\nThe answer is 2.", 12),  # the first one counts
        ("I think it is 12.", None),
        ("The answer is twelve.", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_split_held_out():
    records = math_sft_records(40, seed=0)
    train, held_out = split_held_out(records, 8, seed=5)
    assert len(train) == 32 and len(held_out) == 8
    assert sorted(map(records.index, train + held_out)) == list(range(40))  # disjoint and complete
    assert [records.index(r) for r in train] == sorted(records.index(r) for r in train)  # input order kept
    assert split_held_out(records, 8, seed=5) == (train, held_out)
    assert split_held_out(records, 8, seed=6)[1] != held_out
    assert split_held_out(records, 0, seed=5) == (records, [])
    with pytest.raises(ValueError, match="n_held_out=41"):
        split_held_out(records, 41, seed=0)


# ----------------------------------------------------------------------------- stdlib corpus


def test_stdlib_corpus_real():
    start = time.perf_counter()
    documents = stdlib_corpus()
    elapsed = time.perf_counter() - start
    assert len(documents) >= 1000
    assert len(set(documents)) == len(documents)
    assert all(len(d) >= 80 and " ".join(d.split()) == d for d in documents)
    assert elapsed < 30, f"stdlib_corpus took {elapsed:.1f} s; the docstring promises a few seconds"
    assert stdlib_corpus(max_documents=300) == documents[:300]


def test_stdlib_corpus_rules(tmp_path, monkeypatch):
    long = "This docstring is long enough to be kept as a document of the corpus; it explains a thing."
    files = {
        "b.py": (
            f'"""{long}\n\n    Second   paragraph."""\n\ndef f():\n    """{long} (f)"""\n\nclass C:\n    """short"""\n'
        ),
        "a.py": f'"""{long} (a)"""\n\nasync def g():\n    """{long}\n\n    Second   paragraph."""\n',
        "broken.py": f'"""{long} (broken)"""\ndef (:\n',
        "test/test_x.py": f'"""{long} (test)"""\n',
        "idlelib/x.py": f'"""{long} (idle)"""\n',
        "site-packages/pkg/x.py": f'"""{long} (site)"""\n',
        "lib2to3/x.py": f'"""{long} (2to3)"""\n',
        "pkg/z.py": f'"""{long} (pkg)"""\n',
        "notes.txt": f"{long} (txt)",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert stdlib_corpus() == [
        f"{long} (a)",
        f"{long} Second paragraph.",  # whitespace collapsed; its repeat in b.py is dropped
        f"{long} (f)",
        f"{long} (pkg)",
    ]
    assert stdlib_corpus(max_documents=2) == stdlib_corpus()[:2]
    assert stdlib_corpus(max_documents=0) == []
