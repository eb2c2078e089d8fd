"""``sp-train``: the training entry point.

Training (Megatron-core GPT driven by per-step plans) is tracked in the trainer issue and is not implemented
in this version: this command says so and exits with status 2 rather than pretending to train. What works
today: ``sp-plan`` (dry-run planning), ``sp-profile`` (calibration), ``sp-bench`` (benchmarks) and the
``sp`` runtime's exact SP attention (``sp.attention``).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    print(__doc__.strip())
    if args and args[0] in ("-h", "--help"):
        return
    sys.exit(2)
