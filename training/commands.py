"""The ``solar`` subcommands the training package adds: ``pretrain``, ``sft``, ``dpo`` and ``demo``.

setup.py registers each function below as an entry point of the group ``solar_kernels.commands``;
``solar_kernels.cli`` finds them there, so the library never imports ``training``. Each takes the
arguments after its name and returns the exit status, and answers ``--help`` without importing
torch (this module imports nothing heavy).
"""

from __future__ import annotations

import sys

# The config file each stage's examples use (training/configs/tiny_<config>.yaml).
STAGE_CONFIGS = {"pretrain": "pretrain", "sft": "sft", "dpo": "sdpo"}
STAGE_EXAMPLES = """examples:
  solar demo --write-data runs/tiny-data --quick      # once: the tokenizer and data the tiny configs read
  solar {stage} --config training/configs/tiny_{config}.yaml
  solar {stage} --config training/configs/tiny_{config}.yaml --optim.lr=3e-4 --train.steps=50
  torchrun --nproc_per_node 8 -m training.{stage} --config training/configs/solar_10.7b_{config}_8gpu.yaml
"""


def _asks_for_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def _stage(stage: str, argv: list[str]) -> int:
    usage = f"usage: solar {stage} --config FILE [--section.key=value ...]"
    if _asks_for_help(argv):
        print(f"{usage}\n\n" + STAGE_EXAMPLES.format(stage=stage, config=STAGE_CONFIGS[stage]))
        return 0
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        print(
            f"solar {stage}: error: --config FILE is required ({usage}; e.g. --config "
            f"training/configs/tiny_{STAGE_CONFIGS[stage]}.yaml)",
            file=sys.stderr,
        )
        return 2
    from .stages import main

    return main(stage, argv)


def pretrain(argv: list[str]) -> int:
    """train: continued pretraining (see --help)"""
    return _stage("pretrain", argv)


def sft(argv: list[str]) -> int:
    """train: supervised fine-tuning (see --help)"""
    return _stage("sft", argv)


def dpo(argv: list[str]) -> int:
    """train: DPO / sDPO on preference pairs (see --help)"""
    return _stage("dpo", argv)


def demo(argv: list[str]) -> int:
    """the whole recipe on SmolLM2-135M and real text (--toy: the synthetic recipe; --quick: under a minute)"""
    if _asks_for_help(argv):
        from .demo_cli import build_parser

        build_parser().print_help()
        return 0
    from .demo import main

    return main(argv)
