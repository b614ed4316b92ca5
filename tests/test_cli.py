from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from solar_kernels.cli import main
from tests.helpers import break_shard_writer, make_checkpoint


@pytest.fixture
def base(tmp_path):
    return make_checkpoint(tmp_path / "base", layers=4)


def test_upscale_command(base, tmp_path, capsys):
    assert (
        main(["upscale", str(base), str(tmp_path / "up"), "--drop", "1", "--dtype", "bfloat16", "--no-progress"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("wrote") and "6 layers" in out
    config = json.loads((tmp_path / "up" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_upscale_with_slices_and_yaml(base, tmp_path):
    assert main(["upscale", str(base), str(tmp_path / "a"), "--slices", "0:3,1:4", "--no-progress"]) == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["num_hidden_layers"] == 6
    (tmp_path / "dus.yml").write_text(
        "slices:\n  - sources:\n      - {model: base, layer_range: [0, 3]}\n"
        "  - sources:\n      - {model: base, layer_range: [1, 4]}\nmerge_method: passthrough\n"
    )
    assert main(["upscale", "--config", str(tmp_path / "dus.yml"), str(tmp_path / "b"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["num_hidden_layers"] == 6


def test_merge_command(tmp_path):
    a = make_checkpoint(tmp_path / "a", layers=2, seed=1)
    b = make_checkpoint(tmp_path / "b", layers=2, seed=2)
    assert (
        main(
            [
                "merge",
                str(tmp_path / "m"),
                "--models",
                str(a),
                str(b),
                "--method",
                "slerp",
                "--t",
                "0.3",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "m" / "config.json").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["upscale", "{base}", "{tmp}/up", "--drop", "2"], "drop must be an int with 0 < drop < n/2 = 2"),
        (["upscale", "{base}", "{tmp}/up", "--slices", "0:9"], "slice 0:9 is outside the 4 layers"),
        (["upscale", "{tmp}/missing", "{tmp}/up"], "not a checkpoint directory"),
        (["upscale", "{base}"], "expected SRC DST, got 1 path"),
        (
            ["upscale", "{base}", "{base}", "--drop", "1", "--force"],
            "destination {base} is the source checkpoint {base}",
        ),
        (["upscale", "{base}", "{base}/up", "--drop", "1"], "destination {base}/up is inside the source checkpoint"),
        (["upscale", "{base}", "{tmp}", "--force"], "destination {tmp} contains the source checkpoint {base}"),
        (["upscale", "{base}", "{tmp}/m", "--slices", "{base}:0:2,{tmp}/m/x:1:3"], "destination {tmp}/m contains"),
        (["merge", "{tmp}/m", "--models", "{base}", "{base}", "--method", "average"], "method"),
        (["merge", "{tmp}/m"], "give --models"),
        (["merge", "{tmp}/m", "--models", "{base}"], "--models needs two or more checkpoints, got 1: {base}"),
        (
            ["merge", "{base}", "--models", "{base}", "{tmp}/m", "--force"],
            "destination {base} is the source checkpoint",
        ),
        (
            ["merge", "{tmp}/m", "--config", "{tmp}/merge.yml", "--method", "slerp", "--t", "0.5"],
            "--method, --t cannot be combined with --config",
        ),
        (
            [
                "merge",
                "{tmp}/m",
                "--config",
                "{tmp}/merge.yml",
                "--weights",
                "1",
                "1",
                "--base-model",
                "{base}",
                "--density",
                "0.5",
            ],
            "--weights, --base-model, --density cannot be combined with --config",
        ),
    ],
)
def test_bad_input_is_one_line_without_traceback(base, tmp_path, capsys, argv, message):
    argv = [a.format(base=base, tmp=tmp_path) for a in argv]
    before = _contents(base)
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and message.format(base=base, tmp=tmp_path) in err
    assert err.startswith(f"solar {argv[0]}: error: ")
    assert not (tmp_path / "up").exists() and not (tmp_path / "m").exists() and not (base / "up").exists()
    assert _contents(base) == before and sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def _contents(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["upscale", "merge"])
def test_ctrl_c_exits_130_and_writes_nothing(base, tmp_path, capsys, monkeypatch, command):
    calls = break_shard_writer(monkeypatch, 5, KeyboardInterrupt())
    dst = tmp_path / "out"
    argv = (
        [command, str(base), str(dst), "--drop", "1"]
        if command == "upscale"
        else [command, str(dst), "--models", str(base), str(base)]
    )
    assert main(argv + ["--max-shard-size", "10KB", "--no-progress"]) == 130
    assert capsys.readouterr().err == f"solar {command}: interrupted; nothing was written to {dst}\n"
    assert len(calls) == 5 and sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_merge_config_with_dtype_overrides_the_yaml(tmp_path, capsys):
    make_checkpoint(tmp_path / "a", layers=2, seed=1)
    make_checkpoint(tmp_path / "b", layers=2, seed=2)
    (tmp_path / "merge.yml").write_text("models: [{model: a}, {model: b}]\nmerge_method: linear\ndtype: float16\n")
    assert (
        main(
            [
                "merge",
                str(tmp_path / "m"),
                "--config",
                str(tmp_path / "merge.yml"),
                "--dtype",
                "bfloat16",
                "--no-progress",
            ]
        )
        == 0
    )
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    from solar_kernels.checkpoint import CheckpointReader

    reader = CheckpointReader(tmp_path / "m")
    assert {str(reader.dtype(n)) for n in reader.names()} == {"torch.bfloat16"}


def test_version(capsys):
    from importlib.metadata import version

    import solar_kernels

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"solar_kernels {solar_kernels.__version__}\n"
    assert solar_kernels.__version__ == version("solar_kernels")


# Run in a fresh interpreter: which heavy modules did `solar ARGS` import?
_PROBE = """
import json, sys
from solar_kernels.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("torch", "triton", "transformers", "safetensors", "numpy", "training.demo",
                           "training.stages") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        *(
            [c, "--help"]
            for c in ("upscale", "merge", "convert", "generate", "chat", "eval", "pretrain", "sft", "dpo", "demo")
        ),
        ["convert", "gguf", "--help"],
        ["pretrain"],
    ],
)
def test_help_and_version_do_not_import_torch(argv):
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"code": 2 if argv == ["pretrain"] else 0, "heavy": []}, done.stderr
    if argv[-1] == "--help":
        assert "usage: solar" in done.stdout


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_training_stage_without_config_says_it_is_required(stage, capsys):
    assert main([stage, "--train.steps=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"solar {stage}: error: --config FILE is required")


def test_demo_help_comes_from_the_demos_torch_free_parser(capsys, monkeypatch):
    import argparse
    import types

    parser = argparse.ArgumentParser(prog="solar demo")
    parser.add_argument("--only-in-the-demo")
    monkeypatch.setitem(sys.modules, "training.demo_cli", types.SimpleNamespace(build_parser=lambda: parser))
    assert main(["demo", "-h"]) == 0
    assert capsys.readouterr().out == parser.format_help()


@pytest.mark.parametrize("command", ["pretrain", "sft", "dpo", "demo"])
def test_a_training_command_without_the_training_package_is_a_one_line_error(command, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "training.commands", None)  # as if training were not installed
    assert main([command, "--config", "c.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"solar {command}: error: the training package is not importable")
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert f"{command}" in listed and "(not importable here:" in listed


def test_added_commands_come_from_entry_points(capsys, monkeypatch):
    import types
    from importlib.metadata import EntryPoint

    from solar_kernels import cli

    calls = []

    def run(argv):
        """a command a test adds"""
        calls.append(argv)
        return 7

    monkeypatch.setitem(sys.modules, "fake_commands", types.SimpleNamespace(run=run))
    points = [EntryPoint(name, "fake_commands:run", cli.COMMAND_GROUP) for name in ("fake", "merge")]
    monkeypatch.setattr(cli, "entry_points", lambda group: points if group == cli.COMMAND_GROUP else [])
    assert main(["fake", "--x", "1"]) == 7 and calls == [["--x", "1"]]
    with pytest.raises(SystemExit):  # the built-in merge's parser: DST is missing
        main(["merge", "--no-progress"])
    assert calls == [["--x", "1"]]
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert "a command a test adds" in listed and "pretrain" not in listed


@pytest.mark.parametrize("command", ["upscale", "merge"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"examples:\n  solar {command}" in capsys.readouterr().out


def test_console_script_is_installed():
    solar = Path(sys.executable).with_name("solar")
    assert solar.exists(), "pip install -e . provides the `solar` command"
    done = subprocess.run([str(solar), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "upscale" in done.stdout and "merge" in done.stdout
    done = subprocess.run([str(solar), "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("solar_kernels ")
