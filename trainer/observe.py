"""Observability: TensorBoard scalars and Gantt images (rank 0), NVML GPU readings, memory, progress bar."""

from __future__ import annotations

import io
from typing import Any


class GpuMonitor:
    """GPU utilisation and memory through nvidia-ml-py; one info line and no readings without a GPU."""

    def __init__(self, local_rank: int = 0) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(local_rank)
            self._nvml = pynvml
        except Exception as e:  # NVMLError_LibraryNotFound and friends without a GPU
            print(f"[sp-train] NVML unavailable ({type(e).__name__}): no GPU utilisation readings")

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        util = self._nvml.nvmlDeviceGetUtilizationRates(self.handle)
        mem = self._nvml.nvmlDeviceGetMemoryInfo(self.handle)
        return {"gpu/util_pct": float(util.gpu), "gpu/memory_used_gib": mem.used / 2**30}


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

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
