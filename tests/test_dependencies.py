"""Which way the packages depend on each other, and what runs without Triton."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(source: str, where: str) -> list[tuple[int, str]]:
    """(line, module) for every import in ``source``: import statements, ``from`` imports (relative
    ones as written, with their dots) and ``importlib.import_module("...")`` / ``__import__("...")``
    calls with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source, filename=where)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if function in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def imports_of_training(path: Path, root: Path = ROOT) -> list[str]:
    """``path:line: module`` (path from ``root``) for each import of the ``training`` package or below it."""
    return [
        f"{path.relative_to(root)}:{line}: {module}"
        for line, module in imported_modules(path.read_text(encoding="utf-8"), str(path))
        if module == "training" or module.startswith("training.")
    ]


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import training\n", ["training"]),
        ("from training.stages import main\n", ["training.stages"]),
        ("def f():\n    import training.demo as d\n", ["training.demo"]),
        ("import importlib\nimportlib.import_module('training.commands')\n", ["training.commands"]),
        ("from . import training\nimport trainingwheels\nfrom .training import x\n", []),
    ],
)
def test_the_scan_finds_every_spelling_of_an_import_of_training(tmp_path, source, expected):
    (tmp_path / "m.py").write_text(source)
    hits = imports_of_training(tmp_path / "m.py", tmp_path)
    assert [hit.split(": ", 1)[1] for hit in hits] == expected
    assert all(hit.startswith("m.py:") for hit in hits)


def test_solar_kernels_never_imports_training():
    files = sorted((ROOT / "solar_kernels").rglob("*.py"))
    assert len(files) > 20 and ROOT / "solar_kernels" / "cli.py" in files
    assert [hit for path in files for hit in imports_of_training(path)] == []


def test_the_training_commands_are_registered_as_entry_points():
    from importlib.metadata import entry_points

    from solar_kernels.cli import COMMAND_GROUP

    points = {point.name: point.value for point in entry_points(group=COMMAND_GROUP)}
    assert points == {name: f"training.commands:{name}" for name in ("pretrain", "sft", "dpo", "demo")}, (
        "rerun `pip install -e .` after changing setup.py's entry points"
    )


# Import one module in a fresh interpreter where `import triton` fails as it does where Triton is
# not installed, as `import solar_kernels.x` ("import") or as `from solar_kernels import x`
# ("from", which asks the package for x first); print the error, or "" when the import worked.
_WITHOUT_TRITON = """
import importlib, sys
sys.modules["triton"] = None
import solar_kernels
module, form = sys.argv[1:]
parent, _, name = module.rpartition(".")
try:
    if form == "import":
        importlib.import_module(module)
    elif getattr(__import__(parent, fromlist=[name]), name) is not sys.modules[module]:
        raise SystemExit(f"from {parent} import {name} gave another object than the module")
except ImportError as error:
    print(error)
else:
    print("")
"""


# The choice: Triton is a requirement (setup.py, without a platform marker; no guard pretends
# otherwise). The checkpoint reader and merge happen to need only torch; the model, and through it
# upscale and convert, need the kernels.
@pytest.mark.parametrize(
    "module, error",
    [
        ("solar_kernels.checkpoint", ""),
        ("solar_kernels.merge", ""),
        ("solar_kernels.ops", "import of triton halted; None in sys.modules"),
        ("solar_kernels.upscale", "import of triton halted; None in sys.modules"),
        ("solar_kernels.convert", "import of triton halted; None in sys.modules"),
    ],
)
@pytest.mark.parametrize("form", ["import", "from"])
def test_without_triton_only_merge_imports_and_the_rest_says_triton_is_missing(module, error, form):
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TRITON, module, form], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == error


def test_every_tool_says_how_to_run_it_on_its_first_line():
    tools = sorted((ROOT / "tools").glob("*.py"))
    assert {path.name for path in tools} >= {"compile_for_gpu.py", "cuda_sanitize.py"}
    for path in tools:
        first = (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").splitlines()[:1]
        named = (f"tools/{path.name}", f"-m tools.{path.stem}")
        assert first and first[0].startswith("Usage: ") and any(n in first[0] for n in named), (path.name, first)


def test_the_gpu_check_runs_tools_that_exist():
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text(encoding="utf-8")
    named = set(re.findall(r"\b((?:tools|benchmarks)/[\w/]+\.py)\b", script))
    named |= {module.replace(".", "/") + ".py" for module in re.findall(r"-m ((?:tools|benchmarks)\.[\w.]+)", script)}
    assert {"tools/cuda_sanitize.py", "benchmarks/ops.py", "benchmarks/report.py"} <= named
    assert [path for path in sorted(named) if not (ROOT / path).is_file()] == []


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown``: lower case, punctuation dropped,
    spaces as hyphens (``## DUS layer plan`` -> ``dus-layer-plan``)."""
    anchors = set()
    for title in re.findall(r"^#{1,6} +(.+?) *$", markdown, re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-"))
    return anchors


def text_files(root: Path) -> list[tuple[Path, str]]:
    """(path, text) of the source, config and documentation files under ``root``, outside .venv,
    .git, runs/ and build/; this file is left out (its examples are not citations)."""
    suffixes = {".py", ".md", ".yaml", ".yml", ".sh", ".cu", ".cpp", ".h", ".toml", ".txt"}
    found = []
    for path in sorted(p for p in root.rglob("*") if p.suffix in suffixes and p.is_file()):
        if path.relative_to(root).parts[0] in (".venv", ".git", "runs", "build") or path == Path(__file__).resolve():
            continue
        found.append((path, path.read_text(encoding="utf-8", errors="replace")))
    return found


def docs_citations(root: Path) -> list[tuple[str, str, str]]:
    """(where, doc file, anchor) for every ``docs/NAME.md#anchor`` in the tracked text files under
    ``root``, and every ``NAME.md#anchor`` / ``#anchor`` link inside ``docs/*.md``."""
    found = []
    for path, text in text_files(root):
        parts = path.relative_to(root).parts
        where = str(path.relative_to(root))
        found += [(where, f"docs/{name}.md", anchor) for name, anchor in re.findall(r"docs/(\w+)\.md#([\w-]+)", text)]
        if parts[0] == "docs" and len(parts) == 2:
            found += [
                (where, f"docs/{name}.md", anchor) for name, anchor in re.findall(r"\]\((\w+)\.md#([\w-]+)\)", text)
            ]
            found += [(where, where, anchor) for anchor in re.findall(r"\]\(#([\w-]+)\)", text)]
    return found


def test_heading_anchors_follow_githubs_rule():
    assert heading_anchors("# The method\n## DUS layer plan\n### Log-probs through the LM head\n## A, b (c)\n") == {
        "the-method",
        "dus-layer-plan",
        "log-probs-through-the-lm-head",
        "a-b-c",
    }


def broken_citations(root: Path) -> list[str]:
    citations = docs_citations(root)
    anchors = {
        doc: heading_anchors((root / doc).read_text(encoding="utf-8"))
        for doc in {doc for _, doc, _ in citations}
        if (root / doc).exists()
    }
    return [f"{where}: {doc}#{anchor}" for where, doc, anchor in citations if anchor not in anchors.get(doc, ())]


def test_a_citation_of_a_missing_heading_or_doc_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "method.md").write_text("# M\n## DUS layer plan\nsee [x](#nowhere), [y](other.md#a)\n")
    (tmp_path / "code.py").write_text("# docs/method.md#dus-layer-plan docs/method.md#dus docs/gone.md#x\n")
    assert broken_citations(tmp_path) == [
        "code.py: docs/method.md#dus",
        "code.py: docs/gone.md#x",
        "docs/method.md: docs/other.md#a",
        "docs/method.md: docs/method.md#nowhere",
    ]


def test_every_docs_citation_names_a_heading_that_exists():
    assert {"docs/method.md", "docs/benchmarking.md"} <= {doc for _, doc, _ in docs_citations(ROOT)}
    assert broken_citations(ROOT) == []


def imports_of_test_modules(path: Path, root: Path = ROOT) -> list[str]:
    """``path: module`` for each import, in the test file ``path``, of another test module or a
    conftest (``tests.x.test_y``, ``.test_y``, ``tests.x.conftest``); tests.helpers, tests.tolerances
    and the fixtures are what test modules share."""
    hits = []
    for _, module in imported_modules(path.read_text(encoding="utf-8"), str(path)):
        last = module.rsplit(".", 1)[-1]
        if module.startswith(("tests.", ".")) and (last.startswith("test_") or last in ("conftest", "")):
            hits.append(f"{path.relative_to(root).as_posix()}: {module}")
    return hits


# Cross-imports left in files other helpers own (tests/ops: the kernels' check functions;
# tests/training: the demo's use of the tiny GGUF writer, now in tests/helpers.py); each goes to
# tests/helpers.py, then leaves this list.
PENDING_TEST_CROSS_IMPORTS: set[str] = set()


def test_the_scan_finds_imports_of_test_modules_and_conftests(tmp_path):
    (tmp_path / "t.py").write_text(
        "from tests.test_upscale import x\nfrom .test_convert import y\n"
        "from tests.model.conftest import z\nfrom tests.helpers import h\n"
        "from .tolerances import FLOOR\nimport tests.fixtures.mergekit.tiny\n"
    )
    assert imports_of_test_modules(tmp_path / "t.py", tmp_path) == [
        "t.py: tests.test_upscale",
        "t.py: .test_convert",
        "t.py: tests.model.conftest",
    ]


def test_test_modules_share_helpers_only_through_tests_helpers():
    found = {hit for path in sorted((ROOT / "tests").rglob("*.py")) for hit in imports_of_test_modules(path)}
    assert found - PENDING_TEST_CROSS_IMPORTS == set(), "shared helpers belong in tests/helpers.py"
    assert PENDING_TEST_CROSS_IMPORTS - found == set(), "moved: remove it from PENDING_TEST_CROSS_IMPORTS"


# README.md is rewritten by the lead (issue 10's README); its two citations are replaced there.
CITATIONS_LEFT_TO_THE_README_REWRITE = {"README.md"}


def test_no_spec_section_citation_is_left():
    left = [
        f"{path.relative_to(ROOT)}:{number}"
        for path, text in text_files(ROOT)
        if str(path.relative_to(ROOT)) not in CITATIONS_LEFT_TO_THE_README_REWRITE
        for number, line in enumerate(text.splitlines(), 1)
        if "SPEC §" in line
    ]
    assert left == [], "cite the section of docs/method.md or docs/benchmarking.md instead"


# Notes that live only outside the repository (the machine's shared folder, the original task's
# spec and benchmarking pages); what the code needs from them is in docs/.
OUTSIDE_POINTERS = ("/work/shared", "shared/TRITON_CPU", "shared/PEERS", "SPEC.md", "BENCHMARKING.md")


def test_nothing_points_outside_the_repository():
    left = [
        f"{path.relative_to(ROOT)}:{number}: {pointer}"
        for path, text in text_files(ROOT)
        for number, line in enumerate(text.splitlines(), 1)
        for pointer in OUTSIDE_POINTERS
        if pointer in line
    ]
    assert left == [], "point at the section of docs/ that says it instead"
