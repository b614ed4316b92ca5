"""training/plots.py: smoothing, stage offsets, labelled and scaled axes, read from the Figure objects."""

from __future__ import annotations

import json
import math
import random

import pytest

from training import plots


def _history(steps: int, start: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"step": s, "loss": start / (1 + 0.1 * s) + rng.uniform(-0.3, 0.3), "lr": 1e-3} for s in range(1, steps + 1)
    ]


def _lines(figure) -> dict[str, object]:
    return {line.get_gid(): line for ax in figure.axes for line in ax.get_lines() if line.get_gid()}


def test_ema_is_debiased_and_follows_the_recurrence():
    rng = random.Random(0)
    values = [rng.uniform(0, 5) for _ in range(50)]
    weight = 0.8
    smoothed = plots.ema(values, weight)
    assert smoothed[0] == pytest.approx(values[0])  # debiased: the first point is the first value
    accumulated = 0.0
    for t, value in enumerate(values, 1):
        accumulated = weight * accumulated + (1 - weight) * value
        assert smoothed[t - 1] == pytest.approx(accumulated / (1 - weight**t))
    assert plots.ema(values, 0.0) == pytest.approx(values)

    # smoothing reduces the step-to-step variation of a noisy curve
    def roughness(xs):
        return sum(abs(a - b) for a, b in zip(xs, xs[1:]))

    assert roughness(smoothed) < 0.5 * roughness(values)


def test_ema_passes_non_finite_values_through_without_poisoning_the_average():
    smoothed = plots.ema([1.0, math.nan, 3.0], 0.5)
    assert smoothed[0] == 1.0 and math.isnan(smoothed[1])
    assert smoothed[2] == pytest.approx((0.25 * 1.0 + 0.5 * 3.0) / (1 - 0.25))


@pytest.mark.parametrize("weight", [-0.1, 1.0, 2.0])
def test_ema_rejects_a_weight_outside_0_1(weight):
    with pytest.raises(ValueError, match=rf"weight={weight}, expected 0 <= weight < 1"):
        plots.ema([1.0], weight)


def test_chained_puts_each_stage_after_the_previous_one():
    stage1, stage2, stage3 = _history(12, 1, 0), _history(7, 1, 1), _history(3, 1, 2)
    xs = plots.chained([stage1, stage2, stage3])
    assert xs[0] == list(range(1, 13))
    assert xs[1] == list(range(13, 20))
    assert xs[2] == [20, 21, 22]


def _demo_stages() -> dict[str, list[dict]]:
    return {
        "base pretraining": _history(30, 7, 0),
        "continued pretraining": _history(12, 4, 1),
        "SFT": _history(40, 5, 2),
        "sDPO dpo-stage1": _history(8, 0.7, 3),
        "sDPO dpo-stage2": _history(8, 0.7, 4),
        "DPO (all pairs)": _history(16, 0.7, 5),
    }


def test_demo_loss_figure_draws_sdpo_stage_2_after_stage_1_and_labels_every_axis():
    stages = _demo_stages()
    figure = plots.demo_loss_figure(stages)
    lines = _lines(figure)
    stage1, stage2 = lines["sDPO dpo-stage1/raw"].get_xdata(), lines["sDPO dpo-stage2/raw"].get_xdata()
    assert min(stage2) > max(stage1)
    assert list(stage2) == [8 + r["step"] for r in stages["sDPO dpo-stage2"]]
    base, continued = lines["base (4 layers)/raw"].get_xdata(), lines["up-scaled (6 layers), continued/raw"].get_xdata()
    assert min(continued) == max(base) + 1
    # DPO on all pairs trains as many steps as both sDPO stages, from step 1
    assert list(lines["DPO (all pairs)/raw"].get_xdata()) == list(range(1, 17))
    for ax in figure.axes:
        assert ax.get_ylabel() and ax.get_xlabel(), ax.get_title()


def test_every_curve_is_drawn_raw_and_faint_with_its_ema_bold():
    stages = _demo_stages()
    lines = _lines(plots.demo_loss_figure(stages))
    raw, smooth = lines["SFT/raw"], lines["SFT/ema"]
    assert list(raw.get_ydata()) == [r["loss"] for r in stages["SFT"]]
    assert list(smooth.get_ydata()) == pytest.approx(plots.ema([r["loss"] for r in stages["SFT"]]))
    assert raw.get_alpha() < 0.5 and (smooth.get_alpha() or 1.0) == 1.0
    assert smooth.get_linewidth() > raw.get_linewidth() and smooth.get_color() == raw.get_color()
    names = {name.rsplit("/", 1)[0] for name in lines}
    assert all(f"{name}/raw" in lines and f"{name}/ema" in lines for name in names)


def test_accuracy_axis_is_scaled_to_the_data():
    small = plots.accuracy_figure({"before SFT": 0.0, "after SFT": 0.03}, "t", "answers right")
    bottom, top = small.axes[0].get_ylim()
    assert bottom == 0.0 and 0.03 < top <= 0.06  # 3% bars are visible, not squashed under a 0..1 axis
    assert small.axes[0].get_ylabel() == "answers right"
    near_chance = plots.accuracy_figure({"SFT": 0.57, "DPO": 0.62}, "t", "pairs", chance=0.5)
    assert 0.62 < near_chance.axes[0].get_ylim()[1] < 0.8
    zeros = plots.accuracy_figure({"a": 0.0, "b": 0.0}, "t", "y")
    assert zeros.axes[0].get_ylim()[1] > 0


def test_demo_figures_include_the_preference_accuracy_plot():
    figures = plots.demo_figures(_demo_stages(), {"after SFT": 0.1}, {"SFT": 0.55, "sDPO": 0.6})
    assert list(figures) == list(plots.DEMO_PLOTS)
    preference = figures["preference_accuracy.png"].axes[0]
    assert [p.get_height() for p in preference.patches] == [0.55, 0.6]
    assert preference.get_ylabel()


def test_plot_losses_labels_both_axes_and_skips_a_half_written_line(tmp_path, caplog):
    metrics = tmp_path / "metrics.jsonl"
    records = _history(20, 5, 0)
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 21, "lo')
    figure = plots.loss_figure(plots.read_metrics(metrics), "pretrain")
    assert [ax.get_ylabel() for ax in figure.axes] == ["loss", "learning rate"]
    assert len(_lines(figure)["loss/raw"].get_xdata()) == 20
    assert "line 21 is not JSON" in caplog.text
    png = plots.plot_losses(metrics, tmp_path / "loss.png", "pretrain")
    assert png == tmp_path / "loss.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]  # no partial file left
    assert plots.plot_losses(tmp_path / "missing.jsonl", tmp_path / "none.png", "x") is None


def test_plots_are_skipped_with_a_warning_without_matplotlib(monkeypatch, tmp_path, caplog):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plots.save_demo_plots(tmp_path, _demo_stages(), {"a": 0.1}, {"b": 0.5}) == []
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 1e-3}) + "\n")
    assert plots.plot_losses(metrics, tmp_path / "loss.png", "x") is None
    assert "matplotlib is not installed" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_loss_plot_draws_the_held_out_loss_where_records_have_it(tmp_path):
    records = _history(12, 5, 0)
    for record in records[3::4]:  # steps 4, 8, 12: eval_every=4
        record["eval/loss"] = record["loss"] + 0.5
    lines = _lines(plots.loss_figure(records, "pretrain"))
    held_out = lines["eval/loss"]
    assert list(held_out.get_xdata()) == [4, 8, 12]
    assert list(held_out.get_ydata()) == [r["eval/loss"] for r in records[3::4]]
    assert held_out.get_marker() == "o" and held_out.get_label() == "held-out loss"
    assert len(lines["loss/raw"].get_xdata()) == 12
    assert "eval/loss" not in _lines(plots.loss_figure(_history(12, 5, 0), "pretrain"))


def test_figure_and_save_write_a_png_atomically(tmp_path):
    drawn = plots.figure(figsize=(2, 2))
    drawn.add_subplot().plot([1, 2], [3, 4])
    png = plots.save(drawn, tmp_path / "x.png", dpi=50)
    assert png == tmp_path / "x.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
