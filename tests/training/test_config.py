import math

import pytest

from training.config import Config, load_config
from training.trainer import lr_multiplier


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny, tokenizer: tok}\ntrain: {steps: 10, batch_size: 4}\noptim: {lr: 1.0e-3}\n")
    config = load_config(path, ["--optim.lr=3e-4", "--train.grad_accum=2", "--dpo.stages=[a.jsonl, b.jsonl]",
                                "--train.resume=true"])
    assert config.optim.lr == 3e-4 and config.train.steps == 10 and config.train.grad_accum == 2
    assert config.dpo.stages == ["a.jsonl", "b.jsonl"] and config.train.resume is True
    assert config.optim.betas == [0.9, 0.95]  # default kept


@pytest.mark.parametrize("name", ["tiny_pretrain", "tiny_sft", "tiny_sdpo", "solar_10.7b_pretrain_8gpu",
                                  "solar_10.7b_sft_8gpu", "solar_10.7b_sdpo_8gpu"])
def test_example_configs_load(name):
    config = load_config(f"training/configs/{name}.yaml")
    assert isinstance(config, Config) and config.model.checkpoint


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--optim.learning_rate=1"], "unknown key optim.learning_rate; optim has: lr, betas"),
        (["--optimizer.lr=1"], "unknown section 'optimizer'; sections: model, data, optim, train, dpo"),
        (["--train.steps=ten"], "train.steps: expected an integer, got 'ten'"),
        (["--train.resume=maybe"], "train.resume: expected true or false, got 'maybe'"),
        (["--train.steps=0"], "train.steps must be >= 1, got 0"),
        (["--optim.schedule=step"], "optim.schedule must be cosine, linear or constant"),
        (["optim.lr=1"], "must look like --section.key=value"),
        (["--model.checkpoint=x"], "exactly one of model.checkpoint and model.preset"),
    ],
)
def test_bad_config(overrides, message):
    base = [] if any(o.startswith("--model.checkpoint") for o in overrides) else ["--model.preset=tiny"]
    if overrides == ["--model.checkpoint=x"]:
        base = ["--model.preset=tiny"]
    with pytest.raises(ValueError, match=message):
        load_config(None, base + overrides)


def test_missing_file():
    with pytest.raises(ValueError, match="cannot read nowhere.yaml"):
        load_config("nowhere.yaml")


def test_schedule_shapes():
    warm = [lr_multiplier(s, 100, 10, "cosine", 0.1) for s in range(100)]
    assert warm[0] == pytest.approx(0.1) and warm[9] == pytest.approx(1.0)
    assert warm[10] == pytest.approx(1.0) and warm[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(warm[10:], warm[11:]))  # decays monotonically
    linear = [lr_multiplier(s, 20, 0, "linear", 0.0) for s in range(21)]
    assert linear[0] == 1.0 and linear[10] == pytest.approx(0.5) and linear[20] == pytest.approx(0.0)
    assert lr_multiplier(50, 100, 0, "constant", 0.1) == 1.0
