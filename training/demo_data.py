"""The data of ``make demo``, made on the spot: nothing is downloaded.

- ``stdlib_corpus``: a pretraining corpus of English technical prose, the docstrings of the
  running Python's standard library.
- ``math_sft_records``: arithmetic word problems with worked answers, a small stand-in for the
  paper's "Synth. Math-Instruct" (docs/method.md#training-recipe).
- ``math_preference_records``: the same kind of problems with a correct (chosen) and a wrong
  (rejected) worked answer, a small "Synth. Math-Alignment", with a ``difficulty`` for sDPO's
  easy-to-hard order.

Every worked answer ends with the line ``The answer is N.``, which ``extract_answer`` reads back, so
a demo can score generations exactly. Everything is deterministic given the seed (``random.Random``,
whose integer draws are stable across Python versions), and every operand is at most 99 so a tiny
model can learn it.
"""

from __future__ import annotations

import ast
import logging
import os
import random
import re
import sysconfig
import warnings
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- stdlib corpus

# Folders of the standard library whose docstrings are not prose worth learning, or not stdlib.
_SKIPPED_FOLDERS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__"})
_MIN_DOCSTRING_CHARS = 80


def stdlib_corpus(max_documents: int | None = None) -> list[str]:
    """Docstrings of the running Python's standard library, one document each.

    Module, class and function docstrings of every .py file under ``sysconfig.get_paths()["stdlib"]``
    (files in sorted path order, docstrings in ``ast.walk`` order within a file), skipping the
    test, idlelib, lib2to3 and site-packages folders and files that do not parse; each with its
    whitespace collapsed to single spaces, kept when at least 80 characters long, and kept once
    (the first time it is seen). ``max_documents`` stops after that many.

    Fast enough to run at every ``make demo``: on Python 3.11.7, 601 files give 4041 documents
    (1.4 MB of text) in about 1.5 s on a 2-core machine, most of it ``ast.parse``; a capped call
    stops parsing early (200 documents: about 0.07 s).
    """
    if max_documents is not None and max_documents < 0:
        raise ValueError(f"stdlib_corpus: max_documents={max_documents}, expected >= 0 or None")
    root = sysconfig.get_paths()["stdlib"]
    documents: list[str] = []
    seen: set[str] = set()
    if max_documents == 0:
        return documents
    for path in _stdlib_files(root):
        for docstring in _docstrings(path):
            text = " ".join(docstring.split())
            if len(text) < _MIN_DOCSTRING_CHARS or text in seen:
                continue
            seen.add(text)
            documents.append(text)
            if max_documents is not None and len(documents) == max_documents:
                return documents
    if not documents:
        raise RuntimeError(f"stdlib_corpus: found no docstrings under {root!r}")
    return documents


def _stdlib_files(root: str) -> list[str]:
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _SKIPPED_FOLDERS]
        files.extend(os.path.join(folder, name) for name in names if name.endswith(".py"))
    return sorted(files)


def _docstrings(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            source = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning for old escape sequences in some files
            tree = ast.parse(source, filename=path)
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return []
    docstrings = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=True)
            if docstring:
                docstrings.append(docstring)
    return docstrings


# ----------------------------------------------------------------------------- math problems

_NAMES = ("Tom", "Ana", "Lee", "Mia", "Sam", "Ravi", "Zoe", "Omar", "Ines", "Kai", "Lena", "Ben")
_ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "coins", "shells", "cards", "eggs", "stamps")
_CONTAINERS = ("bags", "boxes", "packs", "jars", "baskets")
_ANSWER_LINE = "The answer is {}."
_ANSWER_PATTERN = re.compile(r"the answer is (-?\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class _Ref:
    """The result of an earlier step of the worked answer."""

    step: int


@dataclass(frozen=True)
class _Step:
    """One line of work: ``template`` with ``{expr}`` replaced by ``left op right = value``."""

    template: str
    left: int | _Ref
    op: str
    right: int | _Ref


@dataclass(frozen=True)
class _Problem:
    prompt: str
    steps: tuple[_Step, ...]

    @property
    def difficulty(self) -> int:
        return len(self.steps)


def _apply(op: str, left: int, right: int) -> int:
    return {"+": left + right, "-": left - right, "*": left * right}[op]


def _work(problem: _Problem, slip: tuple[int, int] | None = None) -> tuple[str, int]:
    """(worked answer text, final answer); ``slip = (step, wrong value)`` writes a wrong result there.

    Steps after a slip compute correctly from the wrong value, as a person making one mistake would.
    """
    values: list[int] = []
    lines = []
    for k, step in enumerate(problem.steps):
        left = values[step.left.step] if isinstance(step.left, _Ref) else step.left
        right = values[step.right.step] if isinstance(step.right, _Ref) else step.right
        value = _apply(step.op, left, right)
        if slip is not None and slip[0] == k:
            value = slip[1]
        values.append(value)
        lines.append(step.template.format(expr=f"{left} {step.op} {right} = {value}"))
    answer = values[-1]
    return " ".join(lines) + "\n" + _ANSWER_LINE.format(answer), answer


def _one_step_problem(rng: random.Random) -> _Problem:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        return _Problem(f"What is {a} + {b}?", (_Step("{expr}.", a, "+", b),))
    if kind == 1:
        a = rng.randint(2, 99)
        b = rng.randint(1, a)
        return _Problem(f"What is {a} - {b}?", (_Step("{expr}.", a, "-", b),))
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return _Problem(f"What is {a} * {b}?", (_Step("{expr}.", a, "*", b),))
    if kind == 3:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        return _story(name, item, a, f"gets {b} more", "+", b, asked=" now")
    a = rng.randint(2, 99)
    b = rng.randint(1, a)
    return _story(name, item, a, f"gives away {b}", "-", b)


def _story(
    name: str,
    item: str,
    a: int,
    event: str,
    op: str,
    change: int | _Ref,
    *,
    asked: str = "",
    first: _Step | None = None,
) -> _Problem:
    """The problem ``{name} has {a} {item} and {event}. How many {item} does {name} have{asked}?``,
    answered by ``a op change`` (``op`` "+" or "-"; a "-" story asks and answers with "left"), after
    ``first`` (the step that works out ``change``) when given."""
    left = " left" if op == "-" else ""
    prompt = f"{name} has {a} {item} and {event}. How many {item} does {name} have{asked or left}?"
    last = _Step(f"{name} has {{expr}} {item}{left}.", a, op, change)
    return _Problem(prompt, (first, last) if first is not None else (last,))


def _two_step_problem(rng: random.Random) -> _Problem:
    name, item, container = rng.choice(_NAMES), rng.choice(_ITEMS), rng.choice(_CONTAINERS)
    kind = rng.randrange(4)
    if kind == 0:
        a, count, size = rng.randint(1, 99), rng.randint(2, 9), rng.randint(2, 12)
        bought = _Step(f"{count} {container} of {size} {item} is {{expr}} {item}.", count, "*", size)
        return _story(name, item, a, f"buys {count} {container} of {size} {item}", "+", _Ref(0), first=bought)
    if kind == 1:
        friends, each = rng.randint(2, 9), rng.randint(2, 9)
        a = rng.randint(friends * each, 99)
        given = _Step(f"{name} gives away {{expr}} {item}.", friends, "*", each)
        return _story(name, item, a, f"gives each of {friends} friends {each} {item}", "-", _Ref(0), first=given)
    if kind == 2:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        c = rng.randint(1, min(99, a + b))
        steps = (_Step("{expr}.", a, "+", b), _Step("{expr}.", _Ref(0), "-", c))
        return _Problem(f"What is {a} + {b} - {c}?", steps)
    a, b, c = rng.randint(1, 20), rng.randint(1, 20), rng.randint(2, 9)
    steps = (_Step("{expr}.", a, "+", b), _Step("{expr}.", _Ref(0), "*", c))
    return _Problem(f"What is ({a} + {b}) * {c}?", steps)


def _problems(n: int, seed: int, caller: str) -> tuple[random.Random, list[_Problem]]:
    """``n`` problems with distinct prompts, half one-step and half two-step (alternating)."""
    if n < 0:
        raise ValueError(f"{caller}: n={n}, expected >= 0")
    rng = random.Random(seed)
    problems, prompts = [], set()
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"{caller}: could not make {n} distinct problems; ask for fewer")
        problem = _one_step_problem(rng) if len(problems) % 2 == 0 else _two_step_problem(rng)
        if problem.prompt not in prompts:
            prompts.add(problem.prompt)
            problems.append(problem)
    return rng, problems


def math_sft_records(n: int, seed: int) -> list[dict]:
    """``n`` arithmetic problems with worked answers: ``{"prompt", "response", "answer", "difficulty"}``.

    ``response`` shows each operation (``3 * 7 = 21.``) and ends with ``The answer is N.``;
    ``answer`` is N; ``difficulty`` is the number of operations (1 or 2, alternating). Prompts are
    distinct. Deterministic in ``seed``.
    """
    _, problems = _problems(n, seed, "math_sft_records")
    records = []
    for problem in problems:
        response, answer = _work(problem)
        records.append(
            {"prompt": problem.prompt, "response": response, "answer": answer, "difficulty": problem.difficulty}
        )
    return records


def _slips(op: str, left: int, right: int, value: int) -> list[int]:
    """Plausible wrong results of ``left op right``: off by one, a lost or extra carry, a times-table slip."""
    if op == "*":
        candidates = [value + left, value - left, value + right, value - right, left + right]
    else:
        candidates = [value + 1, value - 1, value + 10, value - 10]
    return sorted({c for c in candidates if c >= 0 and c != value})


def math_preference_records(n: int, seed: int) -> list[dict]:
    """``n`` preference pairs: ``{"prompt", "chosen", "rejected", "answer", "difficulty"}``.

    ``chosen`` is the correct worked answer; ``rejected`` makes one plausible arithmetic mistake (off
    by one, a carry lost or added, a times-table slip, adding instead of multiplying) in one step,
    carries it through the later steps and so ends with a wrong final answer. ``answer`` is the
    correct one; ``difficulty`` (1 or 2: the number of operations) lets sDPO order chunks easy to
    hard. Prompts are distinct. Deterministic in ``seed``.
    """
    rng, problems = _problems(n, seed, "math_preference_records")
    records = []
    for problem in problems:
        chosen, answer = _work(problem)
        # The correct intermediate values, to pick a slip whose final answer stays >= 0.
        values: list[int] = []
        for step in problem.steps:
            left = values[step.left.step] if isinstance(step.left, _Ref) else step.left
            right = values[step.right.step] if isinstance(step.right, _Ref) else step.right
            values.append(_apply(step.op, left, right))
        options = []
        for k, step in enumerate(problem.steps):
            left = values[step.left.step] if isinstance(step.left, _Ref) else step.left
            right = values[step.right.step] if isinstance(step.right, _Ref) else step.right
            for wrong in _slips(step.op, left, right, values[k]):
                text, final = _work(problem, (k, wrong))
                if final >= 0 and final != answer:
                    options.append(text)
        rejected = rng.choice(options)
        records.append(
            {
                "prompt": problem.prompt,
                "chosen": chosen,
                "rejected": rejected,
                "answer": answer,
                "difficulty": problem.difficulty,
            }
        )
    return records


def extract_answer(text: str) -> int | None:
    """The N of the first "The answer is N" in ``text`` (any case), or None.

    The first, not the last: a model that does not stop after its answer may go on to write
    another problem and answer, and the first one is the answer it gave.
    """
    match = _ANSWER_PATTERN.search(text)
    return int(match.group(1)) if match else None


def split_held_out(records: list, n_held_out: int, seed: int) -> tuple[list, list]:
    """(train, held_out): ``n_held_out`` records drawn at random (seeded), the rest; both keep input order."""
    if not 0 <= n_held_out <= len(records):
        raise ValueError(f"split_held_out: n_held_out={n_held_out}, expected 0..{len(records)} (the number of records)")
    held = set(random.Random(seed).sample(range(len(records)), n_held_out))
    train = [record for k, record in enumerate(records) if k not in held]
    held_out = [record for k, record in enumerate(records) if k in held]
    return train, held_out
