"""The command line of ``solar demo`` (``training/demo.py``), importable without torch so that
``solar demo --help`` answers at once."""

from __future__ import annotations

import argparse

# The file solar demo leaves in every folder it makes: only such a folder's previous outputs are
# ever removed (see training.demo.prepare_output).
MARKER = ".solar-demo"
DESCRIPTION = (
    "The whole SOLAR recipe, end to end, on a CPU: SmolLM2-135M from its package, up-scaled to 48 layers, "
    "trained on real text (default); --toy: the synthetic arithmetic recipe on a random model."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="solar demo", description=DESCRIPTION)
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--out",
        default="runs/demo",
        help=f"output folder (default runs/demo): missing, empty, or made by solar demo (it holds "
        f"{MARKER}; its previous outputs are replaced); any other folder is refused",
    )
    what.add_argument(
        "--write-data",
        metavar="DIR",
        help="only write the tokenizer and data files that training/configs/tiny_*.yaml read into DIR "
        "(the same folder rules as --out), then stop",
    )
    what.add_argument(
        "--publish",
        metavar="RUN_DIR",
        help="copy a real run's report and plots to docs/demo/ and regenerate README.md's demo section",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="a non-empty folder not made by solar demo: write into a new subfolder solar-demo-N "
        "of it instead of refusing (nothing already there is touched)",
    )
    parser.add_argument(
        "--toy",
        action="store_true",
        help="the synthetic recipe: a random 4-layer model, stdlib docstrings, generated arithmetic",
    )
    parser.add_argument("--quick", action="store_true", help="the toy recipe at tiny sizes: under a minute")
    parser.add_argument(
        "--cache",
        default="runs/cache/smollm2-135m",
        help="where the converted SmolLM2 model is kept and reused (default runs/cache/smollm2-135m; "
        "delete it to convert again)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser
