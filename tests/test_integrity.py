"""Issue 22: checkpoint integrity hashed in parallel (per-rank entries, split verification), older manifests,
random damage, the fault-injection spec and the preemption budget (no processes spawned)."""

from __future__ import annotations

import hashlib
import json
import signal

import numpy as np
import pytest

from trainer import integrity
from trainer.preempt import _parse_fault, budget_warning


def _folder(tmp_path, n=7, size=50_000):
    rng = np.random.default_rng(0)
    for i in range(n):
        (tmp_path / f"__{i % 3}_{i}.distcp").write_bytes(rng.bytes(size + i))
    (tmp_path / ".metadata").write_bytes(b"meta")
    return tmp_path


def test_rank_entries_merge_into_one_manifest_and_unclaimed_files_are_hashed(tmp_path):
    f = _folder(tmp_path)
    merged = {}
    for rank in range(3):  # each rank hashes what DCP wrote for it
        merged.update(integrity.entries(f, integrity.rank_files(f, rank), rank))
    assert sorted(merged) == sorted(p.name for p in f.glob("__*.distcp"))
    integrity.write(f, merged)
    body = json.loads((f / integrity.MANIFEST).read_text())
    assert body["format"] == 2 and body["hash"] == "xxh3_128"
    assert set(body["files"]) == {p.name for p in f.iterdir() if p.name != integrity.MANIFEST}  # .metadata too
    assert body["files"][".metadata"]["bytes"] == 4


def test_split_verification_covers_every_file_once_and_finds_the_damage(tmp_path):
    f = _folder(tmp_path)
    integrity.write(f, {})
    files = integrity.read(f)
    assert isinstance(files, dict)
    for world in (1, 2, 3, 4, 16):
        shares = [sorted(files)[r::world] for r in range(world)]
        assert sorted(sum(shares, [])) == sorted(files)
        assert all(integrity.check(f, files, r, world) is None for r in range(world))
    bad = f / "__1_4.distcp"
    data = bytearray(bad.read_bytes())
    data[1234] ^= 0x01
    bad.write_bytes(bytes(data))
    for world in (1, 2, 4):
        problems = [integrity.check(f, files, r, world) for r in range(world)]
        owner = sorted(files).index("__1_4.distcp") % world
        assert [p is not None for p in problems] == [r == owner for r in range(world)]
        assert "__1_4.distcp does not match its checksum" in problems[owner]


def test_random_damage_is_always_detected(tmp_path):
    rng = np.random.default_rng(1)
    f = _folder(tmp_path, n=1, size=1 << 20)
    integrity.write(f, {})
    path = f / "__0_0.distcp"
    good = path.read_bytes()
    for trial in range(200):  # flipped bits, zeroed blocks, random overwrites: never the same checksum
        data = bytearray(good)
        at = int(rng.integers(0, len(data) - 4096))
        kind = trial % 3
        if kind == 0:
            data[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            data[at : at + 4096] = bytes(4096)
        else:
            data[at : at + 64] = rng.bytes(64)
        if bytes(data) == good:
            continue
        path.write_bytes(bytes(data))
        assert integrity.verify(f) is not None, trial
    path.write_bytes(good)
    assert integrity.verify(f) is None


def test_manifests_of_earlier_versions_still_verify(tmp_path):
    (tmp_path / "a.distcp").write_bytes(b"x" * 100)
    sha = hashlib.sha256(b"x" * 100).hexdigest()
    (tmp_path / integrity.MANIFEST).write_text(json.dumps({"a.distcp": {"sha256": sha, "bytes": 100}}))
    assert integrity.verify(tmp_path) is None
    (tmp_path / "a.distcp").write_bytes(b"x" * 99 + b"y")
    assert "a.distcp does not match its checksum" in integrity.verify(tmp_path)
    (tmp_path / integrity.MANIFEST).write_text("{not json")
    assert "is not valid JSON" in integrity.verify(tmp_path)


def test_fault_spec_and_its_errors():
    assert _parse_fault("") is None
    assert _parse_fault("save") == ("save", int(signal.SIGUSR1), None, 1)
    assert _parse_fault("save:KILL@1#2") == ("save", int(signal.SIGKILL), 1, 2)
    assert _parse_fault("load:term") == ("load", int(signal.SIGTERM), None, 1)
    with pytest.raises(ValueError, match=r"unknown phase 'boot'; valid: \['start', 'init'"):
        _parse_fault("boot")
    with pytest.raises(ValueError, match="unknown signal 'NOPE'"):
        _parse_fault("save:NOPE")


def test_preemption_budget_warning_names_the_signal_time_to_ask_for():
    assert budget_warning(30.0, 50.0, 90.0) is None
    msg = budget_warning(60.0, 50.0, 90.0)
    assert msg is not None and "110.0 s" in msg and "train.preempt_warning_s=90" in msg
    assert "--signal=B:USR1@142" in msg  # 110 s x 1.2 + 10 s of margin
