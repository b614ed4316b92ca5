"""`solar demo --quick`: the whole recipe end to end on embedded data, in under a minute."""

import json
import time

from solar_kernels.cli import main


def test_quick_demo(tmp_path, capsys, monkeypatch):
    # The tests run Triton through its interpreter; the demo on a CPU uses the torch backend.
    monkeypatch.setenv("SOLAR_KERNELS_BACKEND", "torch")
    started = time.perf_counter()
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    seconds = time.perf_counter() - started
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["held_out_loss"]) == {"base", "upscaled", "continued"}
    assert set(results["answer_accuracy"]) == {"before SFT", "after SFT", "after sDPO", "after DPO", "merged (0.5/0.5)"}
    assert set(results["preference_accuracy"]) == {"SFT", "sDPO", "DPO", "merged"}
    stages = results["stages"]
    assert stages["SFT"]["last_loss"] < stages["SFT"]["first_loss"]
    assert stages["base pretraining"]["last_loss"] < stages["base pretraining"]["first_loss"]
    for name in ("upscaled", "merged", "sdpo/final", "dpo/final"):
        assert (tmp_path / "demo" / name / "config.json").exists()
    assert json.loads((tmp_path / "demo" / "upscaled" / "config.json").read_text())["num_hidden_layers"] == 6
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "Held-out answer accuracy" in report and "losses.png" in report
    assert (tmp_path / "demo" / "losses.png").stat().st_size > 0
    assert "report:" in capsys.readouterr().out
    assert seconds < 180, f"--quick took {seconds:.0f} s"  # under a minute on an idle 2-core machine
