"""Nothing untrusted is unpickled or run (issue 9): every Python file of the repository, read as a
syntax tree, is free of the calls that unpickle, evaluate or hand a string to a shell, and every
``from_pretrained`` says ``trust_remote_code=False``.

What is refused, and the safe spelling:

- ``torch.load(...)`` without ``weights_only=True`` (a checkpoint is a pickle: loading it runs code);
- ``pickle``/``dill``/``cloudpickle``/``joblib``/``marshal``/``shelve`` loading, ``pandas.read_pickle``,
  ``numpy.load(..., allow_pickle=True)``;
- ``eval(...)`` and ``exec(...)``;
- ``yaml.load`` and its ``full_load``/``unsafe_load`` kin (``yaml.safe_load`` reads data only);
- ``subprocess.*(..., shell=True)``, ``os.system``, ``os.popen`` (a list of arguments runs no shell);
- ``*.from_pretrained(...)`` without ``trust_remote_code=False`` (a checkpoint's ``auto_map`` can
  name Python files that transformers would download and run).

Each check wants the keyword spelled out as a literal; ``**kwargs`` cannot be read and is refused.
Nothing is excluded: test files hold their unsafe examples in strings, which are not code.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where the repository keeps Python: the package, training, benchmarks, tests and setup.py.
SCANNED = ("solar_kernels", "training", "benchmarks", "tests", "csrc", "setup.py")

_UNPICKLING = {
    f"{module}.{name}"
    for module in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
    for name in ("load", "loads", "Unpickler")
}
_UNPICKLING |= {"joblib.load", "marshal.load", "marshal.loads", "shelve.open", "pandas.read_pickle"}
_UNSAFE_YAML = {
    f"yaml.{name}" for name in ("load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all")
}
_SHELL = {"os.system", "os.popen"}


def python_files() -> list[Path]:
    """The repository's .py files: git's tracked and not-ignored new ones, else a walk of SCANNED."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "*.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        files = [ROOT / name for name in listed.split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        files = [ROOT / "setup.py"] + [p for top in SCANNED[:-1] for p in (ROOT / top).rglob("*.py")]
    return sorted(p for p in files if p.is_file() and p.relative_to(ROOT).parts[0] in SCANNED)


class _UnsafeCalls(ast.NodeVisitor):
    """Collects (line, message) for each unsafe call in one module."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}  # local name -> the dotted name it was imported as
        self.found: list[tuple[int, str]] = []

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                top = alias.name.split(".")[0]
                self.aliases[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and not node.level:
            for alias in node.names:
                self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def _name(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self._name(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None

    @staticmethod
    def _keyword(node: ast.Call, name: str):
        """The literal value of keyword ``name``: absent -> "absent"; not a literal or **kwargs -> "unknown"."""
        for keyword in node.keywords:
            if keyword.arg == name:
                return keyword.value.value if isinstance(keyword.value, ast.Constant) else "unknown"
        return "unknown" if any(k.arg is None for k in node.keywords) else "absent"

    def visit_Call(self, node: ast.Call) -> None:
        name = self._name(node.func) or ""
        problem = None
        if name == "torch.load" and self._keyword(node, "weights_only") is not True:
            problem = "torch.load without weights_only=True unpickles (runs code from the file)"
        elif name in _UNPICKLING:
            problem = f"{name} unpickles (runs code from the data)"
        elif name == "numpy.load" and self._keyword(node, "allow_pickle") not in ("absent", False):
            problem = "numpy.load with allow_pickle unpickles (runs code from the file)"
        elif name in ("eval", "exec", "builtins.eval", "builtins.exec"):
            problem = f"{name.split('.')[-1]}() runs a string as code"
        elif name in _UNSAFE_YAML:
            problem = f"{name} can build arbitrary Python objects; use yaml.safe_load"
        elif name in _SHELL:
            problem = f"{name} runs its argument through a shell; use subprocess with a list of arguments"
        elif name.startswith("subprocess.") and self._keyword(node, "shell") not in ("absent", False):
            problem = f"{name} with shell=True runs a string through a shell; pass a list of arguments"
        elif (
            isinstance(node.func, ast.Attribute)
            and node.func.attr == "from_pretrained"
            and self._keyword(node, "trust_remote_code") is not False
        ):
            problem = "from_pretrained without trust_remote_code=False may run a checkpoint's remote code"
        if problem:
            self.found.append((node.lineno, problem))
        self.generic_visit(node)


def unsafe_calls(source: str, where: str) -> list[str]:
    """``"where:line: message"`` for each unsafe call in the Python ``source``."""
    try:
        tree = ast.parse(source, filename=where)
    except SyntaxError as error:
        return [f"{where}:{error.lineno}: cannot be parsed ({error.msg}), so it cannot be checked"]
    finder = _UnsafeCalls()
    finder.visit(tree)
    return [f"{where}:{line}: {message}" for line, message in sorted(finder.found)]


UNSAFE_EXAMPLES = [
    ("import torch\nstate = torch.load(path)\n", "x.py:2: torch.load without weights_only=True"),
    ("import torch\nstate = torch.load(path, weights_only=False)\n", "x.py:2: torch.load without weights_only=True"),
    ("import torch\nstate = torch.load(path, **options)\n", "x.py:2: torch.load without weights_only=True"),
    ("from torch import load as read\nstate = read(path)\n", "x.py:2: torch.load without"),
    ("import pickle\nobj = pickle.load(f)\n", "x.py:2: pickle.load unpickles"),
    ("import pickle as p\nobj = p.loads(data)\n", "x.py:2: pickle.loads unpickles"),
    ("from pickle import loads\nobj = loads(data)\n", "x.py:2: pickle.loads unpickles"),
    ("import numpy as np\na = np.load(f, allow_pickle=True)\n", "x.py:2: numpy.load with allow_pickle"),
    ("x = eval(text)\n", "x.py:1: eval() runs a string as code"),
    ("exec(code, {})\n", "x.py:1: exec() runs a string as code"),
    ("import yaml\nc = yaml.load(text, Loader=yaml.Loader)\n", "x.py:2: yaml.load can build arbitrary"),
    ("import yaml\nc = yaml.full_load(text)\n", "x.py:2: yaml.full_load can build"),
    ("import subprocess\nsubprocess.run(cmd, shell=True)\n", "x.py:2: subprocess.run with shell=True"),
    ("from subprocess import check_output\ncheck_output(cmd, shell=flag)\n", "x.py:2: subprocess.check_output with"),
    ("import os\nos.system('make')\n", "x.py:2: os.system runs its argument through a shell"),
    (
        "from transformers import AutoModel\nm = AutoModel.from_pretrained(path)\n",
        "x.py:2: from_pretrained without trust_remote_code=False",
    ),
    ("m = AutoTokenizer.from_pretrained(path, trust_remote_code=True)\n", "x.py:1: from_pretrained without"),
    ("m = transformers.AutoModel.from_pretrained(path, **kwargs)\n", "x.py:1: from_pretrained without"),
    ("def f(:\n", "x.py:1: cannot be parsed"),
]

SAFE_EXAMPLES = """
import subprocess, torch, yaml, numpy as np
state = torch.load(path, weights_only=True, map_location="cpu")
config = yaml.safe_load(text)
subprocess.run(["git", "status"], check=True)
subprocess.run(["ls"], shell=False)
a = np.load(f)
model.eval()
m = AutoModel.from_pretrained(path, trust_remote_code=False)
note = "torch.load(path) and eval(x) in a string are not calls"
"""


@pytest.mark.parametrize("source, expected", UNSAFE_EXAMPLES, ids=[str(i) for i in range(len(UNSAFE_EXAMPLES))])
def test_each_unsafe_call_is_found_with_file_and_line(source, expected):
    (found,) = unsafe_calls(source, "x.py")
    assert found.startswith(expected)


def test_safe_spellings_are_not_flagged():
    assert unsafe_calls(SAFE_EXAMPLES, "safe.py") == []


def test_the_repository_has_no_unsafe_calls():
    files = python_files()
    names = {p.relative_to(ROOT).as_posix() for p in files}
    # The scan reaches every part of the repository (and so this file, which must itself pass).
    assert {
        "setup.py",
        "solar_kernels/checkpoint.py",
        "solar_kernels/cli.py",
        "training/trainer.py",
        "tests/test_safety.py",
    } <= names and any(n.startswith("benchmarks/") for n in names)
    found = [
        problem
        for path in files
        for problem in unsafe_calls(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())
    ]
    assert not found, "unsafe calls (see tests/test_safety.py for the safe spellings):\n" + "\n".join(found)
