"""``solar demo``: the whole SOLAR recipe, end to end, on embedded data, in minutes on a CPU.

1. A byte-level BPE tokenizer and a small base model pretrained on the docstrings of Python's
   standard library (text every machine has).
2. Depth up-scaling of that base (n = 4 layers, m = 1: 6 layers; SOLAR's 32 -> 48 scaled down).
3. Continued pretraining: held-out loss of the base, of the up-scaled model right after scaling,
   and after continued pretraining (the paper: quality drops at scaling and recovers quickly).
4. Instruction tuning on generated arithmetic problems with worked answers (a small
   "Synth. Math-Instruct"), in SOLAR's prompt format.
5. sDPO in two stages (easy one-operation pairs, then two-operation pairs) on generated
   preference pairs, correct vs wrong worked answers (a small "Synth. Math-Alignment"); and plain
   DPO on all pairs at once, for comparison.
6. A linear merge (0.5, 0.5) of the two aligned variants (SOLAR's released model is such an average).
7. A report, ``report.md`` with PNG plots: losses, held-out answer accuracy before and after SFT,
   after DPO/sDPO and after the merge, held-out preference accuracy, tokens/s of every stage.

Every number in the report is measured in that run. ``--quick`` shrinks everything to finish in
under a minute (a smoke test: accuracies stay near zero); the default takes a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

import solar_kernels as sk
from solar_kernels.merge import merge
from solar_kernels.model import generate, load_pretrained
from solar_kernels.upscale import depth_upscale

from . import data as data_lib
from . import demo_data
from .config import Config
from .stages import run_stage
from .tokenizer import load_tokenizer, train_bpe_tokenizer

logger = logging.getLogger(__name__)

SIZES = {
    #         documents vocab seq  base cpt  sft  dpo  problems pairs held-out  batch
    "quick": dict(documents=400, vocab=320, seq=112, base=30, cpt=12, sft=40, dpo=8, problems=200, pairs=96,
                  held_out=16, batch=8),
    "full": dict(documents=6000, vocab=1024, seq=128, base=600, cpt=200, sft=800, dpo=120, problems=4000,
                 pairs=1200, held_out=100, batch=16),
}


def _write_jsonl(path: Path, records: List[Dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _config(**sections) -> Config:
    config = Config()
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    return config


@torch.no_grad()
def held_out_loss(model_dir: Path, rows: List[Dict], batch_size: int) -> float:
    """Mean next-token loss over held-out pretraining rows."""
    model = load_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = data_lib.collate_lm(rows[i:i + batch_size], pad_id=0)
        hidden = model(batch["input_ids"], position_ids=batch["position_ids"], return_hidden=True)
        total += float(sk.linear_cross_entropy(hidden, model.lm_head.weight, batch["labels"], reduction="sum"))
        count += int((batch["labels"] != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def answer_accuracy(model_dir: Path, problems: List[Dict], tokenizer) -> float:
    """Share of held-out problems whose greedy answer's final line has the right number."""
    model = load_pretrained(model_dir).eval()
    prompts = [tokenizer(data_lib.solar_prompt(p["prompt"]))["input_ids"] for p in problems]
    outputs = generate(model, prompts, 64, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    answers = [demo_data.extract_answer(tokenizer.decode(out, skip_special_tokens=True)) for out in outputs]
    return sum(a == p["answer"] for a, p in zip(answers, problems)) / len(problems)


@torch.no_grad()
def preference_accuracy(model_dir: Path, pairs: List[Dict], tokenizer, seq_len: int) -> float:
    """Share of held-out pairs whose chosen answer has the higher log-prob under the model."""
    model = load_pretrained(model_dir).eval()
    examples = data_lib.dpo_examples(pairs, tokenizer, seq_len, seq_len // 2)
    batch = data_lib.collate_dpo(examples, tokenizer.pad_token_id)
    hidden = model(batch["input_ids"], return_hidden=True)
    logps = sk.sequence_logprobs(hidden, model.lm_head.weight, batch["labels"])
    n = len(examples)
    return float((logps[:n] > logps[n:]).float().mean())


def _stage_summary(history: List[Dict]) -> Dict[str, float]:
    return {"first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
            "tokens_per_s": sum(r["tokens_per_s"] for r in history) / len(history), "steps": len(history)}


def run_demo(out: Path, *, quick: bool = False, seed: int = 0) -> Path:
    sizes = SIZES["quick" if quick else "full"]
    started = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    data_dir = out / "data"
    timings: Dict[str, float] = {}

    def timed(name):
        timings[name] = time.perf_counter() - started

    # 1. tokenizer and base model on the standard library's docstrings
    corpus = demo_data.stdlib_corpus(sizes["documents"])
    held_docs = max(8, len(corpus) // 20)
    train_docs, eval_docs = corpus[:-held_docs], corpus[-held_docs:]
    tokenizer = train_bpe_tokenizer(train_docs, sizes["vocab"], out / "tokenizer")
    tokenizer = load_tokenizer(out / "tokenizer")
    corpus_file = _write_jsonl(data_dir / "corpus.jsonl", [{"text": t} for t in train_docs])
    eval_rows = list(data_lib.pretrain_rows([{"text": t} for t in eval_docs], tokenizer, sizes["seq"]))
    common = dict(dtype="float32", backend=None)
    optim = dict(lr=2e-3, warmup_ratio=0.05, schedule="cosine", min_lr_ratio=0.1)
    base_config = _config(model=dict(preset="tiny", tokenizer=str(out / "tokenizer"), **common),
                          data=dict(train=str(corpus_file), seq_len=sizes["seq"]),
                          optim=optim, train=dict(steps=sizes["base"], batch_size=sizes["batch"], seed=seed,
                                                  output_dir=str(out / "base"), log_every=max(1, sizes["base"] // 5)))
    base_history = run_stage("pretrain", base_config)["pretrain"]
    timed("base")

    # 2. depth up-scaling: 4 layers -> 2 * (4 - 1) = 6
    upscaled = out / "upscaled"
    depth_upscale(out / "base" / "final", upscaled, drop=1)
    timed("upscale")

    # 3. continued pretraining
    cpt_config = _config(model=dict(checkpoint=str(upscaled), **common),
                         data=dict(train=str(corpus_file), seq_len=sizes["seq"]),
                         optim=dict(optim, lr=1e-3), train=dict(steps=sizes["cpt"], batch_size=sizes["batch"], seed=seed + 1,
                                                                output_dir=str(out / "cpt"), log_every=max(1, sizes["cpt"] // 5)))
    cpt_history = run_stage("pretrain", cpt_config)["pretrain"]
    losses = {"base": held_out_loss(out / "base" / "final", eval_rows, sizes["batch"]),
              "upscaled": held_out_loss(upscaled, eval_rows, sizes["batch"]),
              "continued": held_out_loss(out / "cpt" / "final", eval_rows, sizes["batch"])}
    timed("continued pretraining")

    # 4. instruction tuning on generated arithmetic
    problems = demo_data.math_sft_records(sizes["problems"] + sizes["held_out"], seed)
    train_problems, eval_problems = problems[:-sizes["held_out"]], problems[-sizes["held_out"]:]
    sft_file = _write_jsonl(data_dir / "math_sft.jsonl", train_problems)
    sft_config = _config(model=dict(checkpoint=str(out / "cpt" / "final"), **common),
                         data=dict(train=str(sft_file), seq_len=sizes["seq"], prompt_format="solar"),
                         optim=dict(optim, lr=1e-3), train=dict(steps=sizes["sft"], batch_size=sizes["batch"], seed=seed + 2,
                                                                output_dir=str(out / "sft"), log_every=max(1, sizes["sft"] // 5)))
    accuracy = {"before SFT": answer_accuracy(out / "cpt" / "final", eval_problems, tokenizer)}
    sft_history = run_stage("sft", sft_config)["sft"]
    accuracy["after SFT"] = answer_accuracy(out / "sft" / "final", eval_problems, tokenizer)
    timed("sft")

    # 5. sDPO (easy then hard) and DPO on all pairs at once
    pairs = demo_data.math_preference_records(sizes["pairs"] + sizes["held_out"], seed + 3)
    train_pairs, eval_pairs = pairs[:-sizes["held_out"]], pairs[-sizes["held_out"]:]
    easy = _write_jsonl(data_dir / "pref_easy.jsonl", [p for p in train_pairs if p["difficulty"] == 1])
    hard = _write_jsonl(data_dir / "pref_hard.jsonl", [p for p in train_pairs if p["difficulty"] > 1])
    everything = _write_jsonl(data_dir / "pref_all.jsonl", train_pairs)
    dpo_common = dict(model=dict(checkpoint=str(out / "sft" / "final"), **common),
                      optim=dict(optim, lr=2e-4, warmup_ratio=0.1))
    histories = {}
    sdpo = _config(**dpo_common, data=dict(seq_len=sizes["seq"], max_prompt_length=sizes["seq"] // 2),
                   dpo=dict(beta=0.1, stages=[str(easy), str(hard)]),
                   train=dict(steps=sizes["dpo"], batch_size=sizes["batch"] // 2, seed=seed + 4,
                              output_dir=str(out / "sdpo"), log_every=max(1, sizes["dpo"] // 3)))
    histories.update({f"sDPO {k}": v for k, v in run_stage("dpo", sdpo).items()})
    dpo = _config(**dpo_common, data=dict(train=str(everything), seq_len=sizes["seq"], max_prompt_length=sizes["seq"] // 2),
                  dpo=dict(beta=0.1), train=dict(steps=2 * sizes["dpo"], batch_size=sizes["batch"] // 2, seed=seed + 4,
                                                 output_dir=str(out / "dpo"), log_every=max(1, sizes["dpo"] // 3)))
    histories.update({"DPO (all pairs)": run_stage("dpo", dpo)["dpo"]})
    timed("dpo")

    # 6. merge the two aligned variants
    merge([out / "sdpo" / "final", out / "dpo" / "final"], out / "merged", method="linear", weights=[0.5, 0.5])
    timed("merge")
    for name, path in (("after sDPO", out / "sdpo" / "final"), ("after DPO", out / "dpo" / "final"),
                       ("merged (0.5/0.5)", out / "merged")):
        accuracy[name] = answer_accuracy(path, eval_problems, tokenizer)
    preference = {name: preference_accuracy(path, eval_pairs, tokenizer, sizes["seq"]) for name, path in (
        ("SFT", out / "sft" / "final"), ("sDPO", out / "sdpo" / "final"), ("DPO", out / "dpo" / "final"),
        ("merged", out / "merged"))}
    timed("evaluation")

    # 7. report
    stages = {"base pretraining": base_history, "continued pretraining": cpt_history, "SFT": sft_history, **histories}
    results = {"mode": "quick" if quick else "full", "sizes": sizes, "held_out_loss": losses,
               "answer_accuracy": accuracy, "preference_accuracy": preference,
               "stages": {k: _stage_summary(v) for k, v in stages.items()}, "seconds": timings,
               "device": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = _plots(out, stages, accuracy)
    report = _report(out, results, plots)
    logger.info("demo finished in %.0f s: %s", time.perf_counter() - started, report)
    return report


def _plots(out: Path, stages: Dict[str, List[Dict]], accuracy: Dict[str, float]) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    base, cpt = stages["base pretraining"], stages["continued pretraining"]
    axes[0].plot([r["step"] for r in base], [r["loss"] for r in base], label="base (4 layers)")
    offset = len(base)
    axes[0].plot([offset + r["step"] for r in cpt], [r["loss"] for r in cpt], label="up-scaled (6 layers), continued")
    axes[0].axvline(offset, color="gray", linestyle=":", linewidth=1)
    axes[0].set_title("pretraining loss: base, then after depth up-scaling")
    axes[0].set_xlabel("step")
    axes[0].legend()
    sft = stages["SFT"]
    axes[1].plot([r["step"] for r in sft], [r["loss"] for r in sft])
    axes[1].set_title("SFT loss")
    axes[1].set_xlabel("step")
    for name, history in stages.items():
        if "DPO" in name:
            axes[2].plot([r["step"] for r in history], [r["loss"] for r in history], label=name)
    axes[2].set_title("DPO / sDPO loss")
    axes[2].set_xlabel("step")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(list(accuracy), list(accuracy.values()))
    ax.set_ylabel("held-out answer accuracy")
    ax.set_ylim(0, 1)
    for i, value in enumerate(accuracy.values()):
        ax.text(i, value + 0.02, f"{value:.0%}", ha="center")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)
    return ["losses.png", "accuracy.png"]


def _report(out: Path, results: Dict, plots: List[str]) -> Path:
    losses, accuracy, preference = results["held_out_loss"], results["answer_accuracy"], results["preference_accuracy"]
    lines = [f"# SOLAR recipe demo ({results['mode']}, {results['device']}, torch {results['torch']})", "",
             "Every number below was measured in this run (`solar demo`).", "",
             "## Held-out pretraining loss", "", "| model | loss |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in
              (("base, 4 layers", losses["base"]), ("right after depth up-scaling, 6 layers", losses["upscaled"]),
               ("after continued pretraining", losses["continued"]))]
    lines += ["", "## Held-out answer accuracy (greedy, final-answer line)", "", "| model | accuracy |", "|---|---|"]
    lines += [f"| {name} | {value:.1%} |" for name, value in accuracy.items()]
    lines += ["", "## Held-out preference accuracy (chosen answer more likely than rejected)", "",
              "| model | accuracy |", "|---|---|"]
    lines += [f"| {name} | {value:.1%} |" for name, value in preference.items()]
    lines += ["", "## Stages", "", "| stage | steps | first loss | last loss | tokens/s |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {s['steps']} | {s['first_loss']:.3f} | {s['last_loss']:.3f} | {s['tokens_per_s']:.0f} |"
              for name, s in results["stages"].items()]
    lines += ["", f"Wall time: {max(results['seconds'].values()):.0f} s.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="solar demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (replaced)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: under a minute")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    report = run_demo(Path(args.out), quick=args.quick, seed=args.seed)
    print(report.read_text())
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
