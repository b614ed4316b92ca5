"""`torchrun ... -m training.pretrain --config FILE [--section.key=value ...]` (same as `solar pretrain`)."""

from __future__ import annotations

import sys

from .stages import main

if __name__ == "__main__":
    sys.exit(main("pretrain"))
