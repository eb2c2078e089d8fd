"""``sp-bench hf-load``: peak host memory per rank while a Hugging Face checkpoint loads into the FSDP-sharded
model (meta build, shard, each rank reads its own rows), on gloo ranks of this machine.

A generated Llama-shaped model (about ``--gb`` GB of fp32 safetensors, sharded files) is saved once; each
rank reports its resident memory before the load (model built and materialised: its shard allocated) and
its peak during the load (``ru_maxrss`` minus what the process had before, sampled in a thread too), next to
the bound ``model bytes / world + largest tensor``. ``full_read`` is the naive path for comparison: one
process reading every tensor (what a rank does when each builds the whole model).
"""

from __future__ import annotations

import json
import math
import resource
import threading
import time
from pathlib import Path


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakRss:
    """The resident set's peak while the block runs, sampled every 2 ms (statm: no allocator hooks)."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = _rss(), False
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def _sample(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, _rss())


def make_model(folder: Path, gb: float) -> dict:
    """A random Llama of about ``gb`` GB in fp32 (hidden 1024, vocab 32000; layers to fit), saved sharded."""
    import torch
    import transformers

    per_layer = 4 * (1024 * 64 * (16 + 2 * 4) + 1024 * 1024 + 3 * 1024 * 2816)
    layers = max(1, round((gb * 1e9 - 2 * 4 * 32000 * 1024) / per_layer))
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                                   num_attention_heads=16, num_key_value_heads=4, head_dim=64)  # fmt: skip
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        with torch.no_grad():
            transformers.LlamaForCausalLM(cfg).save_pretrained(folder, max_shard_size="200MB")
    return {"layers": layers}


def _rank(rank: int, world: int, folder: str) -> dict:
    import torch
    from megatron.core import parallel_state

    from benchmarks.hf_load import PeakRss, _rss
    from models.gpt import build_meta
    from models.hf.config import shape_from_folder
    from models.hf.load import load_into
    from models.shards import materialize
    from trainer.sharding import Regime, parallelize

    parallel_state.initialize_model_parallel(1, 1)
    shape = shape_from_folder(folder)
    model = materialize(parallelize(build_meta(shape, 4096), Regime("fsdp", "fp32", "full"), torch.device("cpu")),
                        torch.device("cpu"))  # fmt: skip
    before = _rss()
    t0 = time.perf_counter()
    with PeakRss() as peak:
        read = load_into(model, folder, shape)
    return {"rank": rank, "rss_before_gib": before / 2**30, "peak_rss_gib": peak.peak / 2**30,
            "load_growth_gib": (peak.peak - before) / 2**30, "bytes_read": read,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def _full_read(folder: str) -> dict:
    from safetensors.torch import load_file

    before = _rss()
    with PeakRss() as peak:
        tensors = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            tensors.update({k: v.clone() for k, v in load_file(f).items()})  # touched: really in memory
    return {"load_growth_gib": (peak.peak - before) / 2**30}


def run(gb: float, world: int, workdir: str) -> list[dict]:
    from sp.spawn import run_distributed

    folder = Path(workdir) / f"llama-{gb:g}gb"
    folder.mkdir(parents=True, exist_ok=True)
    meta = make_model(folder, gb)
    files = sorted(folder.glob("*.safetensors"))
    model_bytes = sum(f.stat().st_size for f in files)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    from safetensors import safe_open

    largest = 0
    for name, file in index.items():
        with safe_open(folder / file, framework="pt") as f:
            largest = max(largest, math.prod(f.get_slice(name).get_shape()) * 4)
    ranks = run_distributed(_rank, world, str(folder), timeout=1800)
    bound = model_bytes / world + largest
    rows = [{"bench": "hf_load", "model_gib": model_bytes / 2**30, "world": world, "layers": meta["layers"],
             "largest_tensor_gib": largest / 2**30, "bound_gib": bound / 2**30, **r,
             "growth_over_bound": r["load_growth_gib"] * 2**30 / bound} for r in ranks]  # fmt: skip
    rows.append({"bench": "hf_load", "case": "full_read (one process reads every tensor)",
                 "model_gib": model_bytes / 2**30, **_full_read(str(folder))})  # fmt: skip
    return rows
