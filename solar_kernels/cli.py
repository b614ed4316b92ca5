"""The ``solar`` command line: depth up-scaling and merging of Hugging Face checkpoints, GGUF
conversion, generation, chat and evaluation; and the subcommands other packages register under the
entry-point group ``solar_kernels.commands`` (the training package's ``pretrain``, ``sft``, ``dpo`` and
``demo``), found without this package importing them.

Each subcommand prints a one-line error (no traceback) and exits with status 2 on bad input, and
with status 130 on Ctrl-C (the partial output removed). ``solar --version`` and every ``--help``
answer without importing torch or the kernels.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from . import __version__

UPSCALE_EXAMPLES = """examples:
  solar upscale ./mistral-7b ./solar-base --drop 8            # 32 layers -> 48 (SOLAR 10.7B)
  solar upscale ./mistral-7b ./custom --slices 0:24,8:32 --dtype bfloat16
  solar upscale ./a ./ab --slices ./a:0:20,./b:12:32          # slices from two checkpoints
  solar upscale --config dus.yml ./solar-base                 # mergekit passthrough YAML
"""

MERGE_EXAMPLES = """examples:
  solar merge ./merged --models ./dpo-a ./dpo-b --method linear --weights 0.5 0.5
  solar merge ./merged --models ./dpo-a ./dpo-b --method slerp --t 0.4
  solar merge ./merged --models ./a ./b --method ties --base-model ./sft --density 0.5
  solar merge ./merged --models ./a --method task_arithmetic --base-model ./sft --weights 0.7
  solar merge ./merged --config merge.yml                     # a mergekit YAML (any method listed below)
  solar merge ./merged --config merge.yml --dtype bfloat16    # the YAML's merge, computed and stored in bf16
  solar merge ./merged --config merge.yml --compute-dtype float32   # exact fp32 math, stored in the YAML's dtype

Methods: linear, slerp, nuslerp, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
breadcrumbs_ties, della, della_linear, model_stock. With --config the YAML describes the whole merge: --method, --weights, --t,
--base-model and --density are refused with it; --dtype, --out-dtype and --compute-dtype override the
YAML's dtype, out_dtype and compute_dtype. As in mergekit, --dtype is the dtype the sources are read
in and the merge is computed in; models of different architectures need --allow-crimes.
"""
# merge options that describe the merge itself: the YAML does that with --config.
MERGE_PLAN_OPTIONS = {
    "method": "--method",
    "weights": "--weights",
    "t": "--t",
    "base_model": "--base-model",
    "density": "--density",
}
# merge options that apply with --config as well (argparse dests, named as merge() and merge_from_yaml name them).
MERGE_RUN_OPTIONS = (
    "max_shard_size",
    "force",
    "progress",
    "dtype",
    "out_dtype",
    "compute_dtype",
    "seed",
    "allow_crimes",
)


def _upscale(args) -> None:
    from .upscale import depth_upscale, parse_slices, upscale_from_yaml

    common = dict(max_shard_size=args.max_shard_size, force=args.force, progress=args.progress)
    if args.config:
        if len(args.paths) != 1:
            raise ValueError(f"with --config give only DST, got {len(args.paths)} paths")
        report = upscale_from_yaml(args.config, args.paths[0], dtype=args.dtype, out_dtype=args.out_dtype, **common)
    else:
        if len(args.paths) != 2:
            raise ValueError(f"expected SRC DST, got {len(args.paths)} path(s)")
        src, dst = args.paths
        slices = parse_slices(args.slices, src) if args.slices else None
        report = depth_upscale(
            src, dst, drop=args.drop, slices=slices, dtype=args.dtype, out_dtype=args.out_dtype, **common
        )
    print(
        f"wrote {report.path}: {report.num_layers} layers, {report.bytes_written / 1e9:.2f} GB "
        f"in {report.seconds:.1f} s ({report.gb_per_second:.2f} GB/s)"
    )


def _merge(args) -> None:
    from .merge import merge, merge_from_yaml

    common = {name: getattr(args, name) for name in MERGE_RUN_OPTIONS}
    if args.config:
        if args.models:
            raise ValueError("give either --config or --models, not both")
        given = [flag for key, flag in MERGE_PLAN_OPTIONS.items() if getattr(args, key) is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} cannot be combined with --config: the YAML describes the merge "
                f"(only the dtype and output options apply to it)"
            )
        path = merge_from_yaml(args.config, args.dst, **common)
    else:
        if not args.models:
            raise ValueError("give --models (two or more checkpoints) or --config FILE.yml")
        if len(args.models) < 2 and args.base_model is None:
            raise ValueError(
                f"--models needs two or more checkpoints, got 1: {args.models[0]} (one is enough with --base-model)"
            )
        path = merge(
            args.models,
            args.dst,
            method=args.method or "linear",
            weights=args.weights,
            t=args.t,
            base_model=args.base_model,
            density=args.density,
            **common,
        )
    print(f"wrote {path}")


# Subcommands other installed packages add (the training package: pretrain, sft, dpo, demo): each
# entry point of this group names a function ``main(argv) -> int`` that parses its own arguments and
# answers --help without importing torch. The library itself never imports those packages.
COMMAND_GROUP = "solar_kernels.commands"
BUILT_IN_COMMANDS = ("upscale", "merge", "convert", "generate", "chat", "eval")


def _added_commands() -> dict[str, EntryPoint]:
    """The entry points of COMMAND_GROUP by name; a built-in command's name stays the built-in's."""
    return {point.name: point for point in entry_points(group=COMMAND_GROUP) if point.name not in BUILT_IN_COMMANDS}


def _summary(point: EntryPoint) -> str:
    """The first line of the command's docstring (loading it imports no torch, by the group's rule)."""
    try:
        command = point.load()
    except ImportError as error:
        return f"(not importable here: {error})"
    return (command.__doc__ or point.value).strip().splitlines()[0]


def _run_added(name: str, point: EntryPoint, argv: list[str]) -> int:
    try:
        command = point.load()
    except ImportError as error:
        package = point.value.split(":")[0].split(".")[0]
        print(
            f"solar {name}: error: the {package} package is not importable ({error}); "
            "run from the repository or install it with `pip install -e .[train]`",
            file=sys.stderr,
        )
        return 2
    return command(argv)


def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """``solar convert gguf FILE DST [--dtype ...] [--max-shard-size ...] [--force]``."""
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    gguf = formats.add_parser(
        "gguf",
        help="a llama.cpp GGUF file (llama architecture) -> Hugging Face directory",
        description="Dequantizes a llama-architecture GGUF file into a Hugging Face "
        "safetensors directory with its tokenizer and chat template.",
    )
    gguf.add_argument("src", metavar="FILE", help="the .gguf file")
    gguf.add_argument("dst", metavar="DST", help="output directory (a new one, unless --force)")
    gguf.add_argument("--dtype", help="output dtype: float32 (default: exact), float16 or bfloat16")
    gguf.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    gguf.add_argument("--force", action="store_true", help="replace an existing DST")


def _add_generation_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The options of ``solar generate`` or ``solar chat`` (``command``)."""
    parser.set_defaults(chat_command=command)
    parser.add_argument(
        "model", metavar="DIR", help="Hugging Face checkpoint directory (config.json, weights, tokenizer)"
    )
    if command == "generate":
        parser.add_argument("prompt", nargs="*", help="prompt text (default: read from stdin)")
        parser.add_argument(
            "--chat", action="store_true", help="send the prompt as a user turn under the chat template"
        )
    parser.add_argument("--system", help="a system message before the first user turn (chat template)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per reply (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    parser.add_argument("--top-p", type=float, help="sample among the most likely tokens whose probability reaches p")
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", help="float32, float16 or bfloat16 (default: the checkpoint's)")
    parser.add_argument("--backend", help="kernels: torch, triton, cuda or auto (default: solar_kernels picks)")


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``solar eval``."""
    parser.add_argument(
        "model", metavar="CHECKPOINT", help="Hugging Face checkpoint directory (config.json, weights, tokenizer)"
    )
    parser.add_argument(
        "--text",
        metavar="FILE_OR_DIR",
        help="held-out text: a .txt (one document), .jsonl/.json/.parquet file, or a folder of them",
    )
    parser.add_argument("--text-field", default="text", help="the field holding each row's text (default: text)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per non-overlapping window (default 1024)")
    parser.add_argument("--max-tokens", type=int, help="read at most this many tokens of --text")
    parser.add_argument(
        "--pairs", metavar="FILE.jsonl", help='preference pairs: {"prompt", "chosen", "rejected"} per line'
    )
    parser.add_argument(
        "--chat", action="store_true", help="put each pair's prompt under the chat template (one user turn)"
    )
    parser.add_argument("--out", metavar="RESULT.json", help="write the results as JSON here")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default 4)")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", help="float32, float16 or bfloat16 (default: the checkpoint's)")
    parser.add_argument("--backend", help="kernels: torch, triton, cuda or auto (default: solar_kernels picks)")


def _convert(args) -> int:
    from . import convert

    return convert.run(args)


def _generation(args) -> int:
    from . import chat

    return chat.run(args)


def _evaluation(args) -> int:
    from . import evaluate

    return evaluate.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="solar", description="SOLAR depth up-scaling toolkit")
    parser.add_argument("--version", action="version", version=f"solar_kernels {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "upscale",
        help="depth up-scale a checkpoint (SOLAR DUS)",
        epilog=UPSCALE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument(
        "paths",
        nargs="+",
        metavar="SRC DST",
        help="source checkpoint directory and output directory (DST outside every source)",
    )
    plan = up.add_mutually_exclusive_group()
    plan.add_argument("--drop", type=int, default=8, help="m: layers dropped at the seam of each copy (default 8)")
    plan.add_argument("--slices", help="layer plan START:END[,...] or PATH:START:END[,...] (half-open)")
    plan.add_argument("--config", help="mergekit passthrough YAML (--dtype overrides its dtype)")
    up.set_defaults(run=_upscale)

    mg = commands.add_parser(
        "merge",
        help="merge checkpoints (linear, SLERP, TIES, DARE, ...)",
        epilog=MERGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mg.add_argument("dst", metavar="DST", help="output directory (outside every source)")
    mg.add_argument("--models", nargs="+", help="checkpoint directories to merge (two or more)")
    mg.add_argument(
        "--config",
        help="mergekit YAML; not with --method, --weights, --t, --base-model, --density; "
        "--dtype, --out-dtype, --compute-dtype override its keys",
    )
    mg.add_argument(
        "--method",
        help="linear (default), slerp, nuslerp, task_arithmetic, ties, dare_ties, "
        "dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear, model_stock",
    )
    mg.add_argument("--weights", type=float, nargs="+", help="one weight per model (all methods but slerp)")
    mg.add_argument("--t", type=float, help="SLERP factor: 0 gives the base (else first) model")
    mg.add_argument("--base-model", help="base checkpoint (task-vector methods; slerp: the t = 0 end)")
    mg.add_argument("--density", type=float, help="share of each task vector kept (ties, dare, breadcrumbs, della)")
    mg.add_argument(
        "--compute-dtype",
        help="dtype of the merge math only, e.g. float32 for exact fp32 math on "
        "unrounded sources (default: --dtype, as mergekit)",
    )
    mg.add_argument(
        "--random-seed", dest="seed", type=int, default=0, help="seed of the dare/della random masks (default 0)"
    )
    mg.add_argument(
        "--allow-crimes",
        action="store_true",
        help="merge models of different architectures (e.g. Llama with Mistral), as mergekit's flag",
    )
    mg.set_defaults(run=_merge)

    cv = commands.add_parser("convert", help="convert a GGUF file to a Hugging Face directory")
    _add_convert_arguments(cv)
    cv.set_defaults(run=_convert)
    for name, text in (
        ("generate", "continue a prompt with a checkpoint, streamed"),
        ("chat", "chat with a checkpoint under its chat template (one turn per line)"),
    ):
        sub = commands.add_parser(name, help=text)
        _add_generation_arguments(sub, name)
        sub.set_defaults(run=_generation)

    ev = commands.add_parser("eval", help="held-out loss/perplexity and preference accuracy of a checkpoint")
    _add_eval_arguments(ev)
    ev.set_defaults(run=_evaluation)

    for name, point in _added_commands().items():  # they parse their own arguments (see main)
        added = commands.add_parser(name, help=_summary(point), add_help=False)
        added.add_argument("arguments", nargs=argparse.REMAINDER)

    for sub in (up, mg):
        sub.add_argument(
            "--dtype",
            help="dtype the sources are read and merged in, and stored in unless --out-dtype: "
            "float32, float16 or bfloat16 (default: keep)",
        )
        sub.add_argument("--out-dtype", help="stored dtype (default: --dtype)")
        sub.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
        sub.add_argument("--force", action="store_true", help="replace an existing DST")
        sub.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=sys.stderr.isatty(),
            help="progress bar (default: when stderr is a terminal)",
        )
    return parser


def _identity(path: Path) -> tuple | None:
    """What tells a replaced ``path`` from the one that was there (None: nothing there)."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_ino, status.st_mtime_ns


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    added = _added_commands()
    if argv and argv[0] in added:
        return _run_added(argv[0], added[argv[0]], argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in ("upscale", "merge"):  # these print their own one-line errors
        return args.run(args)
    dst = Path(args.paths[-1] if args.command == "upscale" else args.dst)
    before = _identity(dst)
    try:
        args.run(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"solar {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The output is built beside DST and renamed into place only when complete (its partial
        # folder is removed on the way out), so DST is either as it was or complete.
        done = _identity(dst) != before
        print(
            f"solar {args.command}: interrupted; "
            + (f"{dst} was already complete" if done else f"nothing was written to {dst}"),
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
