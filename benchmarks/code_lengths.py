"""A second long-tailed length corpus: source files of installed packages, in estimated tokens.

``python -m benchmarks.code_lengths OUT.txt.gz [ROOT ...]`` walks the roots (default: this Python's standard
library and site-packages), takes every source file (``SUFFIXES``), and writes one length per line,
``ceil(bytes / BYTES_PER_TOKEN)`` (a BPE tokenizer averages about 3.5 bytes per token on code), in sorted
path order. ``data/lengths/code_files.txt.gz`` was made this way from this repo's ``.venv`` (torch,
megatron-core, numpy, ...) and ``/usr/lib/python3.11``; it holds lengths only, no text.
"""

from __future__ import annotations

import gzip
import math
import sys
import sysconfig
from pathlib import Path

SUFFIXES = {".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".cuh", ".js", ".rs", ".f", ".f90"}
BYTES_PER_TOKEN = 3.5


def lengths(roots: list[str]) -> list[int]:
    out = []
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.suffix in SUFFIXES and p.is_file() and not p.is_symlink():
                size = p.stat().st_size
                if size > 0:
                    out.append(math.ceil(size / BYTES_PER_TOKEN))
    return out


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m benchmarks.code_lengths OUT.txt.gz [ROOT ...]")
    roots = argv[1:] or [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]
    rows = lengths(roots)
    with gzip.open(argv[0], "wt", encoding="utf-8") as f:
        f.write("".join(f"{n}\n" for n in rows))
    print(f"{len(rows)} files from {roots} -> {argv[0]}")


if __name__ == "__main__":
    main(sys.argv[1:])
