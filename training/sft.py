"""`torchrun ... -m training.sft --config FILE [--section.key=value ...]` (same as `solar sft`)."""

from __future__ import annotations

import sys

from .stages import main

if __name__ == "__main__":
    sys.exit(main("sft"))
