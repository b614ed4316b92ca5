from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from training.config import Config, load_config
from training.trainer import lr_multiplier

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny, tokenizer: tok}\ntrain: {steps: 10, batch_size: 4}\noptim: {lr: 1.0e-3}\n")
    config = load_config(
        path, ["--optim.lr=3e-4", "--train.grad_accum=2", "--dpo.stages=[a.jsonl, b.jsonl]", "--train.resume=true"]
    )
    assert config.optim.lr == 3e-4 and config.train.steps == 10 and config.train.grad_accum == 2
    assert config.dpo.stages == ["a.jsonl", "b.jsonl"] and config.train.resume is True
    assert config.optim.betas == [0.9, 0.95]  # default kept


@pytest.mark.parametrize(
    "name",
    [
        "tiny_pretrain",
        "tiny_sft",
        "tiny_sdpo",
        "solar_10.7b_pretrain_8gpu",
        "solar_10.7b_sft_8gpu",
        "solar_10.7b_sdpo_8gpu",
    ],
)
def test_example_configs_load(name, tmp_path, monkeypatch):
    import yaml

    path = CONFIGS / f"{name}.yaml"
    model = yaml.safe_load(path.read_text())["model"]
    folders = {key: model[key] for key in ("checkpoint", "tokenizer") if model.get(key)}
    assert folders, "each example names its model or tokenizer folder"
    monkeypatch.chdir(tmp_path)  # the configs name their folders relative to where a run starts
    for key, folder in folders.items():  # checked in this order
        with pytest.raises(ValueError, match=f"model.{key}: no such directory {re.escape(folder)}$"):
            load_config(path)
        (tmp_path / folder).mkdir(parents=True)
    config = load_config(path)
    assert isinstance(config, Config) and {key: getattr(config.model, key) for key in folders} == folders


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--optim.learning_rate=1"], "unknown key optim.learning_rate; optim has: lr, betas"),
        (["--optimizer.lr=1"], "unknown section 'optimizer'; sections: model, data, optim, train, dpo"),
        (["--train.steps=ten"], "train.steps: expected an integer, got 'ten'"),
        (["--train.resume=maybe"], "train.resume: expected true or false, got 'maybe'"),
        (["--train.steps=0"], "train.steps must be >= 1, got 0"),
        (["--model.dtype=fp8"], r"model.dtype must be bfloat16, float16 or float32, got 'fp8'$"),
        (["--optim.schedule=step"], "optim.schedule must be cosine, linear or constant"),
        (["optim.lr=1"], "must look like --section.key=value"),
        (["--model.checkpoint=x"], "exactly one of model.checkpoint and model.preset"),
        (["--train.save_every=-1"], r"train.save_every must be >= 0, got -1$"),
        (["--train.keep_last=-2"], r"train.keep_last must be >= 0, got -2$"),
        (["--train.log_every=0"], r"train.log_every must be >= 1, got 0$"),
        (["--optim.warmup_steps=-5"], r"optim.warmup_steps must be >= 0, got -5$"),
        (["--optim.warmup_ratio=1.5"], r"optim.warmup_ratio must be in \[0, 1\], got 1.5$"),
        (["--optim.warmup_ratio=-0.1"], r"optim.warmup_ratio must be in \[0, 1\], got -0.1$"),
        (["--optim.warmup_ratio=.nan"], r"optim.warmup_ratio must be in \[0, 1\], got nan$"),
        (["--optim.min_lr_ratio=2"], r"optim.min_lr_ratio must be in \[0, 1\], got 2.0$"),
        (["--optim.min_lr_ratio=-1"], r"optim.min_lr_ratio must be in \[0, 1\], got -1.0$"),
        (["--optim.grad_clip=-1"], r"optim.grad_clip must be >= 0 \(0 disables clipping\), got -1.0$"),
        (["--dpo.loss_type=kto"], r"dpo.loss_type must be one of sigmoid, .*, got 'kto'$"),
        (["--dpo.loss_type=[sigmoid, kto]"], r"dpo.loss_type must be one of sigmoid, .*, got 'kto'$"),
        (["--dpo.label_smoothing=0.1"], r"^config: dpo: .*cdpo"),
        (["--dpo.loss_type=[sigmoid, sft]", "--dpo.loss_weights=[1]"], r"^config: dpo: .*loss_weights"),
        (["--data.prompt_format=chatml"], r"data.prompt_format must be solar or chat_template, got 'chatml'$"),
        (["--train.device=tpu"], r"train.device must be auto, cpu, cuda or cuda:N, got 'tpu'$"),
        (["--train.device=cuda:x"], r"train.device must be auto, cpu, cuda or cuda:N, got 'cuda:x'$"),
        (["--dpo.stages=[a.jsonl"], r"override --dpo.stages: '\[a.jsonl' is not a valid YAML value \(expected"),
        (["--data.packing_strategy=ffd"], r"data.packing_strategy must be greedy, bfd, wrapped, got 'ffd'$"),
        (["--train.eval_every=-1"], r"train.eval_every must be >= 0, got -1$"),
        (["--train.eval_steps=-3"], r"train.eval_steps must be >= 0, got -3$"),
        (["--data.eval_fraction=1"], r"data.eval_fraction must be in \[0, 1\) \(0: no split\), got 1.0$"),
        (["--data.eval_fraction=-0.5"], r"data.eval_fraction must be in \[0, 1\) \(0: no split\), got -0.5$"),
        (
            ["--train.eval_every=10"],
            r"train.eval_every=10 needs a held-out split; set data.eval_path or data.eval_fraction$",
        ),
        (
            ["--data.eval_path=e.jsonl", "--data.eval_fraction=0.1"],
            r"give one of data.eval_path and data.eval_fraction",
        ),
        (["--data.streaming=true", "--data.eval_fraction=0.1"], r"eval_fraction cannot split a streamed dataset"),
    ],
)
def test_bad_config(overrides, message):
    base = [] if any(o.startswith("--model.checkpoint") for o in overrides) else ["--model.preset=tiny"]
    if overrides == ["--model.checkpoint=x"]:
        base = ["--model.preset=tiny"]
    with pytest.raises(ValueError, match=message) as error:
        load_config(None, base + overrides)
    assert "\n" not in str(error.value)


def test_several_dpo_loss_types_with_weights():
    config = load_config(None, ["--model.preset=tiny", "--dpo.loss_type=[sigmoid, sft]", "--dpo.loss_weights=[1, 0.5]"])
    assert config.dpo.loss_type == ["sigmoid", "sft"] and config.dpo.loss_weights == [1.0, 0.5]


def test_missing_file():
    with pytest.raises(ValueError, match="cannot read nowhere.yaml"):
        load_config("nowhere.yaml")


def test_schedule_shapes():
    warm = [lr_multiplier(s, 100, 10, "cosine", 0.1) for s in range(100)]
    assert warm[0] == pytest.approx(0.1) and warm[9] == pytest.approx(1.0)
    assert warm[10] == pytest.approx(1.0) and warm[-1] == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90))
    )
    assert all(a >= b for a, b in zip(warm[10:], warm[11:]))  # decays monotonically
    linear = [lr_multiplier(s, 20, 0, "linear", 0.0) for s in range(21)]
    assert linear[0] == 1.0 and linear[10] == pytest.approx(0.5) and linear[20] == pytest.approx(0.0)
    assert lr_multiplier(50, 100, 0, "constant", 0.1) == 1.0


def one_line_error(path, overrides=()) -> str:
    with pytest.raises(ValueError) as error:
        load_config(path, overrides)
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_malformed_yaml_names_file_line_and_column(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {preset: tiny}\ntrain: {steps: 10\noptim: {lr: 1.0e-3}\n")
    message = one_line_error(path)
    # The flow mapping opened on line 2 is never closed; the parser notices at line 3, column 6.
    assert message.startswith(f"config: {path} line 3, column 6: not valid YAML (expected ',' or '}}'"), message


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"model": {"preset": "tiny"},\n "train": {"steps": }}\n')
    assert one_line_error(path) == f"config: {path} line 2, column 21: not valid JSON (Expecting value)"


def test_non_utf8_config_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "run.yaml"
    raw = b"model:\n  preset: tiny\ntrain:\n  output_dir: runs/caf" + b"\xe9\n"
    path.write_bytes(raw)
    offset = raw.index(b"\xe9")
    assert one_line_error(path) == (
        f"config: {path} is not UTF-8 text: byte 0xe9 at byte offset {offset} (line 4); save the file as UTF-8"
    )


def test_cuda_device_needs_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        message = one_line_error(None, ["--model.preset=tiny", f"--train.device={device}"])
        assert message == (
            f"config: train.device={device!r} but no CUDA GPU is available "
            f"(torch.cuda.is_available() is False); use auto or cpu"
        )
    for device in ("auto", "cpu"):
        assert load_config(None, ["--model.preset=tiny", f"--train.device={device}"]).train.device == device


def test_cuda_device_index_must_exist(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert load_config(None, ["--model.preset=tiny", "--train.device=cuda:1"]).train.device == "cuda:1"
    message = one_line_error(None, ["--model.preset=tiny", "--train.device=cuda:2"])
    assert message == "config: train.device='cuda:2' but this machine has 2 GPU(s), cuda:0 to cuda:1"


def test_missing_model_folders(tmp_path):
    assert one_line_error(None, ["--model.checkpoint=/nonexistent"]) == (
        "config: model.checkpoint: no such directory /nonexistent"
    )
    # A checkpoint is read by solar_kernels' own loader: local folders only, so a hub-like name is refused too.
    assert one_line_error(None, ["--model.checkpoint=upstage/SOLAR-10.7B-v1.0"]) == (
        "config: model.checkpoint: no such directory upstage/SOLAR-10.7B-v1.0"
    )
    (tmp_path / "weights.safetensors").write_bytes(b"")
    assert one_line_error(None, [f"--model.checkpoint={tmp_path / 'weights.safetensors'}"]) == (
        f"config: model.checkpoint: {tmp_path / 'weights.safetensors'} is a file, expected a directory"
    )
    for tokenizer in ("/nonexistent", "./tok", "runs/demo/tokenizer", "../tok"):
        assert one_line_error(None, ["--model.preset=tiny", f"--model.tokenizer={tokenizer}"]) == (
            f"config: model.tokenizer: no such directory {tokenizer}"
        )


def test_tokenizer_may_be_a_hub_name_or_a_folder(tmp_path):
    # transformers loads a tokenizer by hub name (downloaded or cached), so one that is not a folder is kept.
    for name in ("upstage/SOLAR-10.7B-v1.0", "gpt2"):
        assert load_config(None, ["--model.preset=tiny", f"--model.tokenizer={name}"]).model.tokenizer == name
    config = load_config(None, ["--model.preset=tiny", f"--model.tokenizer={tmp_path}"])
    assert config.model.tokenizer == str(tmp_path)


def test_overwrite_defaults_to_false():
    assert load_config(None, ["--model.preset=tiny"]).train.overwrite is False
    assert load_config(None, ["--model.preset=tiny", "--train.overwrite=true"]).train.overwrite is True


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "runs" / "sft" / "final"
    folder.mkdir(parents=True)
    return folder


@pytest.mark.parametrize(
    "output_dir, relation",
    [
        ("{runs}/sft", "is"),  # the natural slip: the previous stage's output_dir again
        ("{runs}/other/../sft", "is"),  # ".." resolved
        ("{link}", "is"),  # a symlink to runs/sft resolved
        ("{runs}/sft/final", "is inside"),  # final inside the model folder
        ("{runs}/sft/final/nested", "is inside"),
        ("{runs}", "contains"),  # runs/final holds the model (runs/final/base)
    ],
)
def test_export_refuses_to_overwrite_the_input_model(tmp_path, model_dir, output_dir, relation):
    (tmp_path / "link").symlink_to(tmp_path / "runs" / "sft")
    output_dir = output_dir.format(runs=tmp_path / "runs", link=tmp_path / "link")
    if relation == "contains":
        model_dir = tmp_path / "runs" / "final" / "base"
        model_dir.mkdir(parents=True)
    overrides = [f"--model.checkpoint={model_dir}", f"--train.output_dir={output_dir}"]
    message = one_line_error(None, overrides)
    final = (Path(output_dir) / "final").resolve()
    assert message == (
        f"config: train.output_dir/final ({final}) {relation} model.checkpoint ({model_dir.resolve()}), so the "
        f"export would overwrite the input model; choose another train.output_dir or set train.export=false"
    )
    assert load_config(None, overrides + ["--train.export=false"]).train.output_dir == output_dir


def test_export_refuses_to_overwrite_the_tokenizer(tmp_path, model_dir):
    tokenizer = tmp_path / "tok" / "final"
    tokenizer.mkdir(parents=True)
    overrides = ["--model.preset=tiny", f"--model.tokenizer={tokenizer}", f"--train.output_dir={tmp_path / 'tok'}"]
    assert f"model.tokenizer ({tokenizer.resolve()})" in one_line_error(None, overrides)
    fine = load_config(
        None,
        [
            f"--model.checkpoint={model_dir}",
            f"--model.tokenizer={tokenizer}",
            f"--train.output_dir={tmp_path / 'runs' / 'next'}",
        ],
    )
    assert fine.train.output_dir == str(tmp_path / "runs" / "next")
