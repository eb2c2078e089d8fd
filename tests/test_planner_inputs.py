"""Issue 12, item 7: bad planner input is an error naming file:line; no silent caps; output checked first."""

from __future__ import annotations

import gzip
import subprocess
import sys

import numpy as np
import pytest

from planner.lengths import read_lengths, sample_steps


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"100\nabc\n", "x.txt:2: 'abc' is not a whole number"),
        (b"100\n1.5\n", "x.txt:2: '1.5' is not a whole number"),
        (b"100\n0\n", "x.txt:2: length 0; valid: 1 <= length"),
        (b"100\n-5\n", "x.txt:2: '-5' is not a whole number"),
        (b"1" * 30 + b"\n", "x.txt:1: length 1111"),
        (b"100\n\xff\xfe\n", "not UTF-8 text"),
    ],
)
def test_text_rows_are_all_validated(tmp_path, content, message):
    (tmp_path / "x.txt").write_bytes(content)
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("'", "'")):
        read_lengths(str(tmp_path / "x.txt"))


def test_other_bad_files(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        read_lengths(str(tmp_path))
    (tmp_path / "x.gz").write_bytes(b"100\n200\n")
    with pytest.raises(ValueError, match="cannot be read as gzip"):
        read_lengths(str(tmp_path / "x.gz"))
    np.save(tmp_path / "f.npy", np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="lengths must be integers, the array holds float64"):
        read_lengths(str(tmp_path / "f.npy"))
    with gzip.open(tmp_path / "r.jsonl.gz", "wt") as f:
        f.write('{"length": 5}\n{"length": "x"}\n')
    with pytest.raises(ValueError, match=r"r\.jsonl\.gz:2: 'x' is not a whole number"):
        read_lengths(str(tmp_path / "r.jsonl.gz"))
    (tmp_path / "b.jsonl").write_text('{"length": 5}\nnot json\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: not a JSON object"):
        read_lengths(str(tmp_path / "b.jsonl"))


def test_lengths_above_max_len_are_an_error_or_an_explicit_clip(capsys):
    pool = np.array([10, 20, 5000])
    with pytest.raises(ValueError, match="1 of 3 lengths exceed lengths.max_len=1000.*lengths.clip=true"):
        sample_steps(pool, 4, 2, 1000, 0)
    batches = sample_steps(pool, 4, 2, 1000, 0, clip=True)
    assert max(int(b.max()) for b in batches) <= 1000
    assert "1 of 3 lengths capped at 1000" in capsys.readouterr().err


def test_output_checked_before_planning(tmp_path):
    for args, message in [(["output.format=yaml"], "output.format='yaml'; valid"),
                          (["output.picture=/nonexistent/dir/p.png"], "cannot be written")]:  # fmt: skip
        res = subprocess.run([sys.executable, "-m", "cli.plan", "lengths.fixed=[1000,2000]", *args],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert res.returncode == 2 and message in res.stderr, res.stderr[-500:]
