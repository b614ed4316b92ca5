"""The trainer never loses or overwrites a run by surprise, never runs code from a checkpoint, survives
corrupt checkpoints and a half-written metrics line, and stops cleanly on Ctrl-C (issue 9)."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch

import training.stages as stages
from tests.helpers import losses, pretrain_config, run_pretrain, write_config
from training.trainer import TrainingError


class _WritesAFile:
    """Unpickling this creates ``marker``: what a crafted checkpoint file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_an_output_dir_holding_a_run_is_refused_before_the_model_is_built(workspace, tmp_path, monkeypatch):
    run_pretrain(workspace, tmp_path / "run", steps=2, export=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built although the output_dir check should have stopped the run")

    monkeypatch.setattr(stages, "build_model", no_model)
    with pytest.raises(
        ValueError, match=r"already holds a run \(metrics.jsonl, .*--train.resume=true.*--train.overwrite=true"
    ):
        run_pretrain(workspace, tmp_path / "run", steps=2, export=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before  # the old run is untouched


def test_overwrite_replaces_the_previous_run_and_nothing_else(workspace, tmp_path):
    run_pretrain(workspace, tmp_path / "run", steps=6, save_every=2, export=False)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    history = run_pretrain(workspace, tmp_path / "run", steps=4, save_every=2, export=False, overwrite=True)
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == ["step-00000002"]
    assert len(losses(tmp_path / "run")) == 4
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one_and_is_replaced(workspace, tmp_path, caplog):
    run_pretrain(workspace, tmp_path / "run", steps=6, save_every=2, export=False)
    straight = losses(tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    newest = checkpoints / "step-00000004"
    for data in newest.glob("*.distcp"):
        data.write_bytes(data.read_bytes()[:100])  # truncated
    (checkpoints / ".step-00000004.partial").write_text("a stale file where a folder would go")
    with caplog.at_level(logging.WARNING, logger="training.trainer"):
        history = run_pretrain(workspace, tmp_path / "run", steps=6, save_every=2, export=False, resume=True)
    assert [r["step"] for r in history] == [3, 4, 5, 6]
    assert losses(tmp_path / "run") == straight  # resumed exactly from step 2
    assert any(
        "step-00000004 is unusable" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records
    )
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004"]  # re-saved in place


def test_no_usable_checkpoint_is_a_one_line_error(workspace, tmp_path):
    run_pretrain(workspace, tmp_path / "run", steps=4, save_every=2, export=False)
    (tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer.json").write_text('{"step": ')
    with pytest.raises(TrainingError, match=r"cannot resume from any checkpoint in .*trainer.json") as error:
        run_pretrain(workspace, tmp_path / "run", steps=4, save_every=2, export=False, resume=True)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("target", ["rank files", "dcp metadata"])
def test_a_crafted_pickle_in_a_checkpoint_is_never_run(workspace, tmp_path, target):
    run_pretrain(workspace, tmp_path / "run", steps=4, save_every=2, export=False)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    marker = tmp_path / "pwned"
    # the per-rank tensor file (rank0.pt before this change), or torch.distributed.checkpoint's metadata
    victims = sorted(checkpoint.glob("rank0*.pt")) if target == "rank files" else [checkpoint / ".metadata"]
    assert victims
    for victim in victims:
        with open(victim, "wb") as f:
            if target == "dcp metadata":  # a plain pickle, as torch.distributed.checkpoint writes it
                pickle.dump(_WritesAFile(marker), f)
            else:
                torch.save(_WritesAFile(marker), f)
    with pytest.raises(TrainingError, match=r"cannot resume from any checkpoint") as error:
        run_pretrain(workspace, tmp_path / "run", steps=4, save_every=2, export=False, resume=True)
    assert not marker.exists()
    named = "rank0.tensors.pt" if target == "rank files" else "step-00000002"
    assert named in str(error.value)


def test_a_half_written_metrics_line_is_dropped_on_resume(workspace, tmp_path, caplog):
    run_pretrain(workspace, tmp_path / "run", steps=6, save_every=2, export=False)
    straight = losses(tmp_path / "run")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 3.1')  # the process died while writing it
    with caplog.at_level(logging.WARNING, logger="training.trainer"):
        run_pretrain(workspace, tmp_path / "run", steps=6, save_every=2, export=False, resume=True)
    assert losses(tmp_path / "run") == straight
    assert any("half-written last line" in r.getMessage() for r in caplog.records)


def test_ctrl_c_prints_the_checkpoint_and_the_resume_command(workspace, tmp_path, monkeypatch, capsys):
    import training.objectives as objectives

    config = write_config(
        tmp_path / "c.yaml", **pretrain_config(workspace, tmp_path / "run", steps=8, save_every=2, export=False)
    )
    forward, calls = objectives.LanguageModeling.forward, {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(objectives.LanguageModeling, "forward", interrupted)
    assert stages.main("pretrain", ["--config", str(config), "--optim.lr=2e-3"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-2].startswith("solar pretrain: interrupted at step 5; last checkpoint: ")
    assert err[-2].endswith("step-00000004")
    assert err[-1] == f"resume with: solar pretrain --config {config} --optim.lr=2e-3 --train.resume=true"
    monkeypatch.setattr(objectives.LanguageModeling, "forward", forward)
    assert stages.main("pretrain", err[-1].split()[4:]) == 0  # the printed command continues the run
    assert len(losses(tmp_path / "run")) == 8


def test_main_reports_bad_input_in_one_line(workspace, tmp_path, capsys):
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n  preset: tiny\n")
    assert stages.main("pretrain", ["--config", str(tmp_path / "broken.yaml")]) == 2
    (tmp_path / "a_file").write_text("")
    config = write_config(
        tmp_path / "c.yaml", **pretrain_config(workspace, tmp_path / "a_file" / "run", steps=2, export=False)
    )
    assert stages.main("pretrain", ["--config", str(config)]) == 2  # output_dir under a file: an OSError
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("solar pretrain: error: ") for line in err), err
    assert "a_file" in err[1]
