"""Observability: TensorBoard scalars and Gantt images (rank 0), NVML GPU readings, memory, progress bar."""

from __future__ import annotations

import io
import os
from typing import Any


def nvml_device(local_rank: int, visible: str | None) -> int | str:
    """The NVML handle key of this rank's GPU: NVML counts physical devices and ignores
    ``CUDA_VISIBLE_DEVICES``, so local rank i means the i-th visible entry (an index, or a GPU UUID)."""
    if not visible:
        return local_rank
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if local_rank >= len(entries):
        raise ValueError(f"LOCAL_RANK={local_rank} but CUDA_VISIBLE_DEVICES={visible!r} lists {len(entries)} GPUs")
    entry = entries[local_rank]
    return int(entry) if entry.isdigit() else entry


class GpuMonitor:
    """GPU utilisation and memory of this rank's GPU through nvidia-ml-py; one info line and no readings
    without a GPU."""

    def __init__(self, local_rank: int | None = None) -> None:
        self.handle = None
        self._failed: set[str] = set()
        local = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
        try:
            import pynvml

            pynvml.nvmlInit()
            key = nvml_device(local, os.environ.get("CUDA_VISIBLE_DEVICES"))
            if isinstance(key, int):
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(key)
            else:
                self.handle = pynvml.nvmlDeviceGetHandleByUUID(key)
            self._nvml = pynvml
        except Exception as e:  # NVMLError_LibraryNotFound and friends without a GPU
            print(f"[sp-train] NVML unavailable ({type(e).__name__}): no GPU utilisation readings")

    def read(self) -> dict[str, float]:
        """The readings this GPU supports; one that fails (NotSupported under MIG, a GPU lost) is skipped
        and reported once, never raised into the step."""
        if self.handle is None:
            return {}
        out: dict[str, float] = {}
        for name, fn in (("gpu/util_pct", lambda: float(self._nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)),
                         ("gpu/memory_used_gib",
                          lambda: self._nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**30)):  # fmt: skip
            if name in self._failed:
                continue
            try:
                out[name] = fn()
            except Exception as e:  # pynvml.NVMLError_NotSupported (MIG) and friends
                self._failed.add(name)
                print(f"[sp-train] NVML reading {name} unavailable ({type(e).__name__}: {e}); skipped from now on")
        return out


class Board:
    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def picture(self, step: int, plan: Any, cost: Any) -> None:
        import matplotlib.image as mpimg

        from planner.picture import draw_gantt

        buf = io.BytesIO()
        draw_gantt(plan, cost, buf, f"step {step}")  # type: ignore[arg-type]
        buf.seek(0)
        img = mpimg.imread(buf, format="png")[..., :3]  # [H, W, 3]
        self.writer.add_image("plan/gantt", img, step, dataformats="HWC")

    def figure(self, tag: str, step: int, fig: Any) -> None:
        self.writer.add_figure(tag, fig, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
