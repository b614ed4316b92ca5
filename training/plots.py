"""Every plot the training code draws: a run's loss curve (``loss.png``) and the demo's figures.

One matplotlib set-up for all of them (``figure``, and ``save`` to write one): matplotlib is
optional (the ``train`` extra), imported only when a plot is drawn, and drawn on its Agg canvas
(files only: no display, no pyplot state shared with the caller). Without matplotlib a plot is
skipped with one warning and the functions that save return ``None`` / ``[]``.

The figure builders (``loss_figure``, ``demo_loss_figure``, ``accuracy_figure``) return the
``matplotlib.figure.Figure`` so tests can read what was drawn (axis labels, x offsets, limits)
without looking at pixels; the savers write it to a PNG atomically (a temporary file renamed into
place).

Per-step curves are noisy: each is drawn raw and faint with its exponential moving average bold
over it, as TensorBoard shows scalars (``ema``). Lines carry a ``gid`` of ``"<series>/raw"`` or
``"<series>/ema"``; the held-out loss of a run (``eval/loss``, logged every ``eval_every`` steps)
is drawn as it is, with markers, gid ``"eval/loss"``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# EMA weight of the smoothed curves: about a 10-step window, enough to read the trend of a loss
# logged every step in the demo's 30-800-step stages without hiding a rise at the end.
SMOOTHING = 0.9
RAW_ALPHA = 0.25
DEMO_PLOTS = ("losses.png", "answer_accuracy.png", "preference_accuracy.png")


def ema(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average with the start-up bias removed (TensorBoard's smoothing).

    ``s_t = weight * s_{t-1} + (1 - weight) * v_t`` from ``s_0 = 0``, reported as
    ``s_t / (1 - weight**n_t)`` where ``n_t`` counts the finite values so far, so the first point
    is the first value (not pulled towards zero). A non-finite value is passed through as it is
    and does not enter the average. ``weight = 0`` gives the values back.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"ema: weight={weight}, expected 0 <= weight < 1")
    smoothed: list[float] = []
    accumulated, count = 0.0, 0
    for value in values:
        value = float(value)
        if not math.isfinite(value):
            smoothed.append(value)
            continue
        count += 1
        accumulated = weight * accumulated + (1.0 - weight) * value
        smoothed.append(accumulated / (1.0 - weight**count))
    return smoothed


def figure(**kwargs: Any):
    """A new Figure on the Agg canvas (``kwargs`` go to ``matplotlib.figure.Figure``), or None (with a
    warning) when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed (pip install -e .[train]): plots are skipped")
        return None
    drawn = Figure(**kwargs)
    FigureCanvasAgg(drawn)
    return drawn


def save(drawn, png: Path, dpi: int = 100) -> Path:
    """Writes the Figure ``drawn`` to ``png`` atomically (a hidden partial file renamed into place)."""
    png = Path(png)
    partial = png.with_name(f".{png.name}.partial")
    drawn.savefig(partial, dpi=dpi, format="png")
    os.replace(partial, png)
    return png


def _smoothed_line(
    ax, xs: Sequence[float], ys: Sequence[float], name: str, *, color: str | None = None, label: str | None = None
):
    """The raw curve faint, its EMA bold in the same colour; the EMA carries the legend label."""
    (raw,) = ax.plot(xs, ys, color=color, alpha=RAW_ALPHA, linewidth=0.8, label="_nolegend_")
    raw.set_gid(f"{name}/raw")
    (smooth,) = ax.plot(xs, ema(ys), color=raw.get_color(), linewidth=1.8, label=label or name)
    smooth.set_gid(f"{name}/ema")
    return smooth


# ----------------------------------------------------------------------------- one run's loss


def read_metrics(metrics_jsonl: Path) -> list[dict]:
    """The records of a metrics.jsonl that have a step and a loss; an unreadable line is skipped
    with a warning (a run killed mid-write leaves half a line)."""
    metrics_jsonl = Path(metrics_jsonl)
    if not metrics_jsonl.exists():
        return []
    records = []
    for number, line in enumerate(metrics_jsonl.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s line %d is not JSON; left out of the plot", metrics_jsonl, number)
            continue
        if isinstance(record, dict) and "step" in record and "loss" in record:
            records.append(record)
    return records


def loss_figure(records: Sequence[Mapping[str, float]], title: str):
    """Loss (raw and smoothed) against step, the held-out loss where records have ``eval/loss``, the
    learning rate on a second axis; None without matplotlib."""
    drawn = figure(figsize=(7, 4), layout="tight")
    if drawn is None:
        return None
    ax = drawn.add_subplot()
    steps = [r["step"] for r in records]
    _smoothed_line(ax, steps, [r["loss"] for r in records], "loss", label="training loss")
    evaluated = [r for r in records if "eval/loss" in r]
    if evaluated:
        (line,) = ax.plot(
            [r["step"] for r in evaluated],
            [r["eval/loss"] for r in evaluated],
            color="tab:orange",
            marker="o",
            markersize=4,
            linewidth=1.4,
            label="held-out loss",
        )
        line.set_gid("eval/loss")
        ax.legend(fontsize=8, loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if any("lr" in r for r in records):
        lr_axis = ax.twinx()
        (line,) = lr_axis.plot(
            steps,
            [r.get("lr", math.nan) for r in records],
            color="gray",
            alpha=0.6,
            linestyle="--",
            label="learning rate",
        )
        line.set_gid("lr")
        lr_axis.set_ylabel("learning rate")
    return drawn


def plot_losses(metrics_jsonl: Path, png: Path, title: str) -> Path | None:
    """Loss (and lr) against step from a metrics.jsonl, drawn to a PNG; None without matplotlib or records."""
    records = read_metrics(metrics_jsonl)
    if not records:
        return None
    drawn = loss_figure(records, title)
    return None if drawn is None else save(drawn, png, dpi=110)


# ----------------------------------------------------------------------------- the demo


def chained(histories: Sequence[Sequence[Mapping[str, float]]]) -> list[list[float]]:
    """x values that put each history after the previous one: cumulative steps.

    History k's steps are shifted by the last step of every history before it, so a stage that
    starts from where the previous one ended (continued pretraining after the base, sDPO stage 2
    after stage 1) is drawn after it, not on top of it.
    """
    offset, xs = 0.0, []
    for history in histories:
        xs.append([offset + r["step"] for r in history])
        if history:
            offset += history[-1]["step"]
    return xs


def _chain(ax, named: Sequence[tuple[str, Sequence[Mapping[str, float]]]], boundary_label: str) -> None:
    """Histories one after the other (``chained``), a dotted line and ``boundary_label`` at each seam."""
    xs = chained([history for _, history in named])
    for (name, history), x in zip(named, xs):
        _smoothed_line(ax, x, [r["loss"] for r in history], name)
    for x in xs[1:]:
        if x:
            ax.axvline(x[0] - 0.5, color="gray", linestyle=":", linewidth=1)
            ax.text(
                x[0],
                0.02,
                f" {boundary_label}",
                transform=ax.get_xaxis_transform(),
                rotation=90,
                ha="left",
                va="bottom",
                fontsize=7,
                color="gray",
            )


def demo_loss_figure(stages: Mapping[str, Sequence[Mapping[str, float]]]):
    """The demo's three loss panels: pretraining (base, then the up-scaled model continued), SFT,
    and preference tuning (sDPO's stages one after the other; DPO on all pairs on the same steps)."""
    drawn = figure(figsize=(15, 4.2), layout="tight")
    if drawn is None:
        return None
    pretraining, sft, preference = drawn.subplots(1, 3)
    _chain(
        pretraining,
        [
            ("base (4 layers)", stages["base pretraining"]),
            ("up-scaled (6 layers), continued", stages["continued pretraining"]),
        ],
        "depth up-scaling",
    )
    pretraining.set_title("pretraining: base, then after depth up-scaling")
    pretraining.set_ylabel("training loss (next token)")
    _smoothed_line(sft, [r["step"] for r in stages["SFT"]], [r["loss"] for r in stages["SFT"]], "SFT")
    sft.set_title("instruction tuning (SFT)")
    sft.set_ylabel("training loss (answer tokens)")
    sdpo = [(name, history) for name, history in stages.items() if name.startswith("sDPO")]
    _chain(preference, sdpo, "next sDPO stage")
    for name, history in stages.items():
        if "DPO" in name and not name.startswith("sDPO"):
            _smoothed_line(preference, [r["step"] for r in history], [r["loss"] for r in history], name)
    preference.set_title("preference tuning: sDPO stages in sequence, DPO")
    preference.set_ylabel("DPO loss")
    for ax in (pretraining, sft, preference):
        ax.set_xlabel("step (cumulative over stages)" if ax is not sft else "step")
        ax.legend(fontsize=8)
    return drawn


def accuracy_figure(accuracy: Mapping[str, float], title: str, ylabel: str, *, chance: float | None = None):
    """Bars of accuracies in [0, 1], the axis scaled to the largest value (and the chance line)."""
    drawn = figure(figsize=(8, 3.6), layout="tight")
    if drawn is None:
        return None
    ax = drawn.add_subplot()
    names, values = list(accuracy), [float(v) for v in accuracy.values()]
    ax.bar(names, values, color="tab:blue")
    top = max(values + ([chance] if chance is not None else []) + [0.0])
    # Room above the tallest bar for its label; at least 5 points so all-zero bars still show an axis.
    top = min(1.0, max(0.05, top * 1.2))
    ax.set_ylim(0.0, top)
    for i, value in enumerate(values):
        ax.text(i, value + top * 0.02, f"{value:.0%}", ha="center", fontsize=9)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance ({chance:.0%})")
        ax.legend(fontsize=8, loc="lower right")
    ax.yaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelsize=8)
    return drawn


def demo_figures(
    stages: Mapping[str, Sequence[Mapping[str, float]]],
    answer_accuracy: Mapping[str, float],
    preference_accuracy: Mapping[str, float],
) -> dict[str, Any]:
    """{file name: Figure} for the demo's report, in ``DEMO_PLOTS`` order; {} without matplotlib."""
    losses = demo_loss_figure(stages)
    if losses is None:  # no matplotlib: warned once, nothing drawn
        return {}
    return {
        "losses.png": losses,
        "answer_accuracy.png": accuracy_figure(
            answer_accuracy, "held-out answer accuracy (greedy, final-answer line)", "answers right"
        ),
        "preference_accuracy.png": accuracy_figure(
            preference_accuracy, "held-out preference accuracy", "pairs with chosen more likely", chance=0.5
        ),
    }


def save_demo_plots(
    out: Path,
    stages: Mapping[str, Sequence[Mapping[str, float]]],
    answer_accuracy: Mapping[str, float],
    preference_accuracy: Mapping[str, float],
) -> list[str]:
    """Write the demo's PNGs into ``out``; their file names (none without matplotlib)."""
    figures = demo_figures(stages, answer_accuracy, preference_accuracy)
    for name, drawn in figures.items():
        save(drawn, Path(out) / name)
    return list(figures)
