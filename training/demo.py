"""``solar demo --toy``: the whole SOLAR recipe on a small random model and synthetic arithmetic.

``solar demo`` without ``--toy`` runs the real recipe (SmolLM2-135M, real text: ``training.demo_real``);
this module holds the toy recipe below, the output-folder rules both share, and ``--publish``.

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

Every number in the report is measured in that run. ``--quick`` (always the toy) shrinks everything
to finish in under a minute (a smoke test: accuracies stay near zero); ``--toy`` alone takes a few
minutes on a CPU.

The output folder (``--out``, default ``runs/demo``) must be missing, empty, or one the demo made
itself (it writes a marker file, ``.solar-demo``): then only the demo's own previous outputs in it
are replaced. Any other non-empty folder is refused before any work; with ``--force`` the run
goes into a new subfolder ``solar-demo-N`` of it instead, and nothing already there is touched
(so ``--out .`` or ``--out ~`` can never delete anything).

``solar demo --write-data DIR`` writes only the tokenizer and the data files that
``training/configs/tiny_*.yaml`` read (the README's training commands start from it).
``solar demo --publish RUN_DIR`` copies a real run's report and plots to ``docs/demo/`` and
regenerates the README's demo section from that report (``readme_section``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

import solar_kernels as sk
from solar_kernels import evaluate
from solar_kernels.merge import merge
from solar_kernels.model import generate, load_pretrained
from solar_kernels.upscale import depth_upscale

from . import data as data_lib
from . import demo_data, plots
from .config import Config, validate
from .demo_cli import MARKER, build_parser
from .demo_real import STAGE_OUTPUTS, held_out_loss, preference_margins
from .demo_real import write_jsonl as _write_jsonl
from .stages import run_stage
from .tokenizer import load_tokenizer, train_bpe_tokenizer

logger = logging.getLogger(__name__)

SIZES = {
    #         documents vocab seq  base cpt  sft  dpo  problems pairs held-out  batch
    "quick": dict(
        documents=400, vocab=320, seq=112, base=30, cpt=12, sft=40, dpo=8, problems=200, pairs=96, held_out=16, batch=8
    ),
    "full": dict(
        documents=6000,
        vocab=1024,
        seq=128,
        base=600,
        cpt=200,
        sft=800,
        dpo=120,
        problems=4000,
        pairs=1200,
        held_out=100,
        batch=16,
    ),
}


# What a run writes into --out, and what --write-data writes into its folder: the only names a
# later run removes from a folder holding the marker (anything else there is left alone).
RUN_OUTPUTS = (*STAGE_OUTPUTS, "base", *plots.DEMO_PLOTS)
DATA_FILES = (
    "tokenizer",
    "corpus.jsonl",
    "math_sft.jsonl",
    "math_pref_easy.jsonl",
    "math_pref_hard.jsonl",
    "math_pref_all.jsonl",
)
README_START, README_END = "<!-- demo-report:start -->", "<!-- demo-report:end -->"


def prepare_output(out: Path, outputs: tuple[str, ...], *, force: bool = False) -> Path:
    """The folder to write into, checked before any work; never removes what solar demo did not write.

    - a missing or empty folder is used (and created), with the marker file ``.solar-demo`` in it;
    - a folder with the marker was made by solar demo: its previous ``outputs`` are removed
      (only those names; other files stay);
    - any other non-empty folder is refused (``ValueError``), unless ``force``: then the run goes
      into a new subfolder ``solar-demo-N`` of it and nothing already there is touched.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; expected a folder (missing, empty, or made by solar demo)")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        if not force:
            raise ValueError(
                f"{out} is not empty and was not made by solar demo (no {MARKER} file in it); "
                f"nothing was changed. Give a new or empty folder, or add --force to write into a new "
                f"subfolder {out / 'solar-demo-N'}"
            )
        number = 1
        while (out / f"solar-demo-{number}").exists():
            number += 1
        out = out / f"solar-demo-{number}"
        logger.warning(
            "--force: the folder is not solar demo's, so this run writes into %s (nothing else is touched)", out
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in outputs:
        previous = out / name
        if previous.is_symlink() or previous.is_file():
            previous.unlink()
        elif previous.is_dir():
            shutil.rmtree(previous)
    marker = {"written_by": "solar demo", "version": sk.__version__, "outputs": list(outputs)}
    (out / MARKER).write_text(json.dumps(marker) + "\n")
    return out


@dataclass
class DemoData:
    """The files ``write_data`` wrote (paths), and the held-out records kept out of them."""

    tokenizer: Path
    corpus: Path
    sft: Path
    preference_easy: Path
    preference_hard: Path
    preference_all: Path
    eval_documents: list[str]
    eval_problems: list[dict]
    eval_pairs: list[dict]


def write_data(directory: Path, sizes: dict, seed: int = 0) -> DemoData:
    """The demo's data and tokenizer, in the files ``training/configs/tiny_*.yaml`` read.

    ``tokenizer/`` (byte-level BPE trained on the corpus), ``corpus.jsonl`` (``{"text"}``: the
    standard library's docstrings), ``math_sft.jsonl`` (``{"prompt", "response"}``: worked
    arithmetic), ``math_pref_{easy,hard,all}.jsonl`` (``{"prompt", "chosen", "rejected"}``: one-
    operation pairs, two-operation pairs, both). Held-out documents, problems and pairs (the last
    of each) are returned, not written.
    """
    directory = Path(directory)
    corpus = demo_data.stdlib_corpus(sizes["documents"])
    held_docs = max(8, len(corpus) // 20)
    train_docs, eval_docs = corpus[:-held_docs], corpus[-held_docs:]
    train_bpe_tokenizer(train_docs, sizes["vocab"], directory / "tokenizer")
    problems = demo_data.math_sft_records(sizes["problems"] + sizes["held_out"], seed)
    pairs = demo_data.math_preference_records(sizes["pairs"] + sizes["held_out"], seed + 3)
    train_pairs = pairs[: -sizes["held_out"]]
    return DemoData(
        tokenizer=directory / "tokenizer",
        corpus=_write_jsonl(directory / "corpus.jsonl", [{"text": t} for t in train_docs]),
        sft=_write_jsonl(directory / "math_sft.jsonl", problems[: -sizes["held_out"]]),
        preference_easy=_write_jsonl(
            directory / "math_pref_easy.jsonl", [p for p in train_pairs if p["difficulty"] == 1]
        ),
        preference_hard=_write_jsonl(
            directory / "math_pref_hard.jsonl", [p for p in train_pairs if p["difficulty"] > 1]
        ),
        preference_all=_write_jsonl(directory / "math_pref_all.jsonl", train_pairs),
        eval_documents=eval_docs,
        eval_problems=problems[-sizes["held_out"] :],
        eval_pairs=pairs[-sizes["held_out"] :],
    )


def _config(**sections) -> Config:
    config = Config()
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    validate(config)  # the checks a config file gets
    return config


@torch.no_grad()
def answer_accuracy(model_dir: Path, problems: list[dict], tokenizer) -> float:
    """Share of held-out problems whose greedy answer's final line has the right number."""
    model = load_pretrained(model_dir).eval()
    prompts = [tokenizer(data_lib.solar_prompt(p["prompt"]))["input_ids"] for p in problems]
    outputs = generate(model, prompts, 64, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    answers = [demo_data.extract_answer(tokenizer.decode(out, skip_special_tokens=True)) for out in outputs]
    return sum(a == p["answer"] for a, p in zip(answers, problems)) / len(problems)


def _stage_summary(history: list[dict]) -> dict[str, float]:
    return {
        "first_loss": history[0]["loss"],
        "last_loss": history[-1]["loss"],
        "tokens_per_s": sum(r["tokens_per_s"] for r in history) / len(history),
        "steps": len(history),
    }


def run_demo(out: Path, *, quick: bool = False, seed: int = 0, force: bool = False) -> Path:
    """Run the recipe into ``out`` (see ``prepare_output`` for which folders are accepted); the report's path."""
    sizes = SIZES["quick" if quick else "full"]
    out = prepare_output(out, RUN_OUTPUTS, force=force)
    day, commit = date.today().isoformat(), _git_commit()
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name):
        timings[name] = time.perf_counter() - started

    # 1. data, tokenizer and base model on the standard library's docstrings
    data = write_data(out / "data", sizes, seed)
    tokenizer = load_tokenizer(data.tokenizer)
    corpus_file = data.corpus
    eval_windows = evaluate.token_windows(
        evaluate.encoded_documents(tokenizer, data.eval_documents), sizes["seq"], tokenizer.eos_token_id
    )
    common = dict(dtype="float32", backend=None)
    optim = dict(lr=2e-3, warmup_ratio=0.05, schedule="cosine", min_lr_ratio=0.1)
    base_config = _config(
        model=dict(preset="tiny", tokenizer=str(data.tokenizer), **common),
        data=dict(train=str(corpus_file), seq_len=sizes["seq"]),
        optim=optim,
        train=dict(
            steps=sizes["base"],
            batch_size=sizes["batch"],
            seed=seed,
            output_dir=str(out / "base"),
            log_every=max(1, sizes["base"] // 5),
        ),
    )
    base_history = run_stage("pretrain", base_config)["pretrain"]
    timed("base")

    # 2. depth up-scaling: 4 layers -> 2 * (4 - 1) = 6
    upscaled = out / "upscaled"
    depth_upscale(out / "base" / "final", upscaled, drop=1)
    timed("upscale")

    def lm_stage(name: str, checkpoint: Path, train_file, seed_offset: int, **data):
        """The config of the language-modeling stage ``name`` (cpt, sft): sizes[name] steps into out/name."""
        return _config(
            model=dict(checkpoint=str(checkpoint), **common),
            data=dict(train=str(train_file), seq_len=sizes["seq"], **data),
            optim=dict(optim, lr=1e-3),
            train=dict(
                steps=sizes[name],
                batch_size=sizes["batch"],
                seed=seed + seed_offset,
                output_dir=str(out / name),
                log_every=max(1, sizes[name] // 5),
            ),
        )

    # 3. continued pretraining
    cpt_config = lm_stage("cpt", upscaled, corpus_file, 1)
    cpt_history = run_stage("pretrain", cpt_config)["pretrain"]
    losses = {
        "base": held_out_loss(out / "base" / "final", eval_windows),
        "upscaled": held_out_loss(upscaled, eval_windows),
        "continued": held_out_loss(out / "cpt" / "final", eval_windows),
    }
    timed("continued pretraining")

    # 4. instruction tuning on generated arithmetic
    eval_problems, sft_file = data.eval_problems, data.sft
    sft_config = lm_stage("sft", out / "cpt" / "final", sft_file, 2, prompt_format="solar")
    accuracy = {"before SFT": answer_accuracy(out / "cpt" / "final", eval_problems, tokenizer)}
    sft_history = run_stage("sft", sft_config)["sft"]
    accuracy["after SFT"] = answer_accuracy(out / "sft" / "final", eval_problems, tokenizer)
    timed("sft")

    # 5. sDPO (easy then hard) and DPO on all pairs at once
    eval_pairs, easy, hard, everything = (
        data.eval_pairs,
        data.preference_easy,
        data.preference_hard,
        data.preference_all,
    )
    dpo_common = dict(
        model=dict(checkpoint=str(out / "sft" / "final"), **common), optim=dict(optim, lr=2e-4, warmup_ratio=0.1)
    )
    histories = {}
    sdpo = _config(
        **dpo_common,
        data=dict(seq_len=sizes["seq"], max_prompt_length=sizes["seq"] // 2),
        dpo=dict(beta=0.1, stages=[str(easy), str(hard)]),
        train=dict(
            steps=sizes["dpo"],
            batch_size=sizes["batch"] // 2,
            seed=seed + 4,
            output_dir=str(out / "sdpo"),
            log_every=max(1, sizes["dpo"] // 3),
        ),
    )
    histories.update({f"sDPO {k}": v for k, v in run_stage("dpo", sdpo).items()})
    dpo = _config(
        **dpo_common,
        data=dict(train=str(everything), seq_len=sizes["seq"], max_prompt_length=sizes["seq"] // 2),
        dpo=dict(beta=0.1),
        train=dict(
            steps=2 * sizes["dpo"],
            batch_size=sizes["batch"] // 2,
            seed=seed + 4,
            output_dir=str(out / "dpo"),
            log_every=max(1, sizes["dpo"] // 3),
        ),
    )
    histories.update({"DPO (all pairs)": run_stage("dpo", dpo)["dpo"]})
    timed("dpo")

    # 6. merge the two aligned variants
    merge([out / "sdpo" / "final", out / "dpo" / "final"], out / "merged", method="linear", weights=[0.5, 0.5])
    timed("merge")
    for name, path in (
        ("after sDPO", out / "sdpo" / "final"),
        ("after DPO", out / "dpo" / "final"),
        ("merged (0.5/0.5)", out / "merged"),
    ):
        accuracy[name] = answer_accuracy(path, eval_problems, tokenizer)
    solar_pairs = [dict(pair, prompt=data_lib.solar_prompt(pair["prompt"])) for pair in eval_pairs]
    preference = {
        name: evaluate.preference_accuracy(preference_margins(path, solar_pairs, chat=False))
        for name, path in (
            ("SFT", out / "sft" / "final"),
            ("sDPO", out / "sdpo" / "final"),
            ("DPO", out / "dpo" / "final"),
            ("merged", out / "merged"),
        )
    }
    timed("evaluation")

    # 7. report
    stages = {"base pretraining": base_history, "continued pretraining": cpt_history, "SFT": sft_history, **histories}
    results = {
        "mode": "quick" if quick else "full",
        "sizes": sizes,
        "held_out_loss": losses,
        "answer_accuracy": accuracy,
        "preference_accuracy": preference,
        "stages": {k: _stage_summary(v) for k, v in stages.items()},
        "seconds": timings,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "machine": _machine(),
        "torch_threads": torch.get_num_threads(),
        "date": day,
        "commit": commit,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    written = plots.save_demo_plots(out, stages, accuracy, preference)
    report = out / "report.md"
    report.write_text(render_report(results, written))
    logger.info("demo finished in %.0f s: %s", time.perf_counter() - started, report)
    return report


def render_report(results: dict, plot_names: list[str]) -> str:
    """The report's Markdown from a run's ``results.json`` dict (and the PNGs written beside it)."""
    losses, accuracy, preference = results["held_out_loss"], results["answer_accuracy"], results["preference_accuracy"]
    lines = [
        f"# SOLAR recipe demo ({results['mode']}, {results['device']}, torch {results['torch']})",
        "",
        "Every number below was measured in this run (`solar demo`).",
        "",
        "## Held-out pretraining loss",
        "",
        "| model | loss |",
        "|---|---|",
    ]
    lines += [
        f"| {name} | {value:.3f} |"
        for name, value in (
            ("base, 4 layers", losses["base"]),
            ("right after depth up-scaling, 6 layers", losses["upscaled"]),
            ("after continued pretraining", losses["continued"]),
        )
    ]
    lines += ["", "## Held-out answer accuracy (greedy, final-answer line)", "", "| model | accuracy |", "|---|---|"]
    lines += [f"| {name} | {value:.1%} |" for name, value in accuracy.items()]
    lines += [
        "",
        "## Held-out preference accuracy (chosen answer more likely than rejected)",
        "",
        "| model | accuracy |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value:.1%} |" for name, value in preference.items()]
    lines += ["", "## Stages", "", "| stage | steps | first loss | last loss | tokens/s |", "|---|---|---|---|---|"]
    lines += [
        f"| {name} | {s['steps']} | {s['first_loss']:.3f} | {s['last_loss']:.3f} | {s['tokens_per_s']:.0f} |"
        for name, s in results["stages"].items()
    ]
    lines += ["", f"Wall time: {max(results['seconds'].values()):.0f} s.", ""]
    lines += [f"![{name}]({name})" for name in plot_names]
    return "\n".join(lines) + "\n"


# Sections of the report the README's block leaves out (they stay in docs/demo/report.md): the README
# keeps the numbers and the first plot, the report keeps everything.
README_OMITS = ("Held-out loss during", "Stages", "Generations", "Data")  # the curve: the first plot


def readme_section(report: str, note: str, image_prefix: str = "docs/demo/") -> str:
    """The README's demo block from a report: headings three levels down (the README's section is
    ``##``), ``note`` (machine, date, commit) after the title, image paths under ``image_prefix``;
    the sections named in ``README_OMITS`` and every plot but the first are left to the report."""
    lines, skipping, images = [], False, 0
    for line in report.rstrip("\n").split("\n"):
        if line.startswith("## "):
            skipping = line[3:].startswith(README_OMITS)
        elif line.startswith("Wall time:"):
            skipping = False
        if skipping:
            continue
        if line.startswith("#"):
            line = "###" + line + (f" — {note}" if not lines else "")
        elif line.startswith("![") and line.endswith(")") and "](" in line:
            images += 1
            if images > 1:
                continue
            label, target = line[2:-1].split("](", 1)
            line = f"![{label}]({image_prefix}{target})"
        lines.append(line)
    return "\n".join(lines).rstrip("\n") + "\n"


def _atomic_write(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def _machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()}-core {platform.machine()} CPU machine"


def _git_commit() -> str:
    """The checkout's short commit, with "+changes" when its tracked files differ from it; "unknown" outside git."""
    try:

        def git(*args):
            return subprocess.run(
                ["git", *args],
                capture_output=True,
                text=True,
                check=True,
                timeout=10,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()

        return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _machine_note(results: dict) -> str:
    """Where and when a run was made, as the run recorded it: machine, torch threads, date, commit."""
    machine = results.get("machine", "unknown machine")
    if results.get("device") == "cpu" and "torch_threads" in results:
        machine += f", {results['torch_threads']} torch thread{'s' if results['torch_threads'] != 1 else ''}"
    return f"{machine}, {results.get('date', 'unknown date')}, commit {results.get('commit', 'unknown')}"


def publish(
    run_dir: Path,
    docs_dir: Path = Path("docs/demo"),
    readme: Path = Path("README.md"),
    note: str | None = None,
    *,
    require_full: bool = True,
) -> Path:
    """Copy a finished run's report and plots to ``docs_dir`` and regenerate the README's demo block
    (between ``README_START`` and ``README_END``) from that report. Everything is checked first;
    each file is written under a temporary name and renamed into place."""
    run_dir, docs_dir, readme = Path(run_dir), Path(docs_dir), Path(readme)
    report_file = run_dir / "report.md"
    if not report_file.is_file():
        raise ValueError(f"--publish: {report_file} does not exist; expected a finished solar demo run")
    results = json.loads((run_dir / "results.json").read_text())
    if require_full and results.get("mode") != "real":
        raise ValueError(
            f"--publish: {run_dir} is a {results.get('mode')!r} run; expected a real run "
            "(solar demo without --toy or --quick)"
        )
    report = report_file.read_text()
    images = [line[2:-1].split("](", 1)[1] for line in report.splitlines() if line.startswith("![")]
    missing = [name for name in images if not (run_dir / name).is_file()]
    if missing:
        raise ValueError(f"--publish: {run_dir} lacks {', '.join(missing)} named in its report")
    text = readme.read_text()
    if text.count(README_START) != 1 or text.count(README_END) != 1:
        raise ValueError(f"--publish: {readme} must hold {README_START} and {README_END} once each")
    docs_dir.mkdir(parents=True, exist_ok=True)
    for stale in docs_dir.glob("*.png"):
        if stale.name not in images:
            stale.unlink()
    for name in images:
        partial = docs_dir / f".{name}.partial"
        shutil.copyfile(run_dir / name, partial)
        os.replace(partial, docs_dir / name)
    _atomic_write(docs_dir / "report.md", report)
    head, rest = text.split(README_START)
    _, tail = rest.split(README_END)
    prefix = os.path.relpath(docs_dir.resolve(), readme.resolve().parent).replace(os.sep, "/") + "/"
    block = readme_section(report, note or _machine_note(results), prefix)
    _atomic_write(readme, head + README_START + "\n" + block + README_END + tail)
    return docs_dir / "report.md"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.publish:
            print(f"wrote {publish(Path(args.publish))} and README.md's demo section")
            return 0
        if args.write_data:
            folder = prepare_output(Path(args.write_data), DATA_FILES, force=args.force)
            write_data(folder, SIZES["quick" if args.quick else "full"], args.seed)
            print(f"wrote the tokenizer and data of training/configs/tiny_*.yaml to {folder}")
            return 0
        if args.toy or args.quick:
            report = run_demo(Path(args.out), quick=args.quick, seed=args.seed, force=args.force)
        else:
            from .demo_real import run_real_demo

            report = run_real_demo(Path(args.out), cache=Path(args.cache), seed=args.seed, force=args.force)
    except (ValueError, OSError) as error:
        print(f"solar demo: error: {error}", file=sys.stderr)
        return 2
    print(report.read_text())
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
