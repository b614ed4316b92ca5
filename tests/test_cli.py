import json
import subprocess
import sys
from pathlib import Path

import pytest

from solar_kernels.cli import main
from tests.test_upscale import make_checkpoint


@pytest.fixture
def base(tmp_path):
    return make_checkpoint(tmp_path / "base", layers=4)


def test_upscale_command(base, tmp_path, capsys):
    assert main(["upscale", str(base), str(tmp_path / "up"), "--drop", "1", "--dtype", "bfloat16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrote") and "6 layers" in out
    config = json.loads((tmp_path / "up" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_upscale_with_slices_and_yaml(base, tmp_path):
    assert main(["upscale", str(base), str(tmp_path / "a"), "--slices", "0:3,1:4", "--no-progress"]) == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["num_hidden_layers"] == 6
    (tmp_path / "dus.yml").write_text(
        "slices:\n  - sources:\n      - {model: base, layer_range: [0, 3]}\n"
        "  - sources:\n      - {model: base, layer_range: [1, 4]}\nmerge_method: passthrough\n")
    assert main(["upscale", "--config", str(tmp_path / "dus.yml"), str(tmp_path / "b"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["num_hidden_layers"] == 6


def test_merge_command(tmp_path):
    a = make_checkpoint(tmp_path / "a", layers=2, seed=1)
    b = make_checkpoint(tmp_path / "b", layers=2, seed=2)
    assert main(["merge", str(tmp_path / "m"), "--models", str(a), str(b), "--method", "slerp", "--t", "0.3",
                 "--no-progress"]) == 0
    assert (tmp_path / "m" / "config.json").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["upscale", "{base}", "{tmp}/up", "--drop", "2"], "drop must be an int with 0 < drop < n/2 = 2"),
        (["upscale", "{base}", "{tmp}/up", "--slices", "0:9"], "slice 0:9 is outside the 4 layers"),
        (["upscale", "{tmp}/missing", "{tmp}/up"], "not a checkpoint directory"),
        (["upscale", "{base}"], "expected SRC DST, got 1 path"),
        (["upscale", "{base}", "{base}", "--drop", "1"], "already exists"),
        (["merge", "{tmp}/m", "--models", "{base}", "{base}", "--method", "average"], "method"),
        (["merge", "{tmp}/m"], "give --models"),
    ],
)
def test_bad_input_is_one_line_without_traceback(base, tmp_path, capsys, argv, message):
    argv = [a.format(base=base, tmp=tmp_path) for a in argv]
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and message in err
    assert err.startswith(f"solar {argv[0]}: error: ")
    assert not (tmp_path / "up").exists() and not (tmp_path / "m").exists()


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
