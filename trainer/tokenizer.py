"""The run's tokenizer: a Hugging Face ``tokenizers`` file or model folder, checked against the model's
vocabulary at start and kept in the run folder (``sp-export`` ships it with the weights)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

# the files a Hugging Face folder keeps its tokenizer in (those present are recorded and exported)
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
         "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")  # fmt: skip


def tokenizer_file(spec: str) -> Path:
    """``data.tokenizer``: a ``tokenizer.json`` file, or a folder holding one."""
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"data.tokenizer={spec!r}: {path} does not exist (a tokenizers JSON file or a Hugging Face "
                         "model folder with tokenizer.json)")  # fmt: skip
    return path


def load(spec: str, vocab: int) -> Any:
    """The tokenizer, refused when its ids do not fit the model's embedding (``model.vocab``)."""
    from tokenizers import Tokenizer

    path = tokenizer_file(spec)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type on a malformed file
        raise ValueError(f"{path}: not a tokenizers JSON file ({str(e).splitlines()[0]})") from None
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab:
        raise ValueError(f"{path}: the tokenizer has {size} tokens, more than model.vocab={vocab}; valid: a "
                         f"tokenizer of <= {vocab} tokens, or a model with vocab >= {size}")  # fmt: skip
    return tok


def record(spec: str, folder: Path) -> list[str]:
    """Copy the tokenizer's files into ``folder`` (the run's ``tokenizer/``); returns their names."""
    src = Path(spec)
    files = [src / f for f in FILES if (src / f).is_file()] if src.is_dir() else [src]
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, folder / ("tokenizer.json" if not src.is_dir() else f.name))
    return [f.name for f in files]
