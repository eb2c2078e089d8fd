"""``sp-bench cpu-kernel``: torch's fused CPU attention (``aten::_scaled_dot_product_flash_attention_for_cpu``
and its ``_backward``, which take an external (out, lse) as a ring needs) against our tiled reference kernel
(``sp.kernels.TorchKernel``), forward + backward of one block pair as the ring calls it (512 query rows x
``keys`` keys, causal diagonal or full), fp32 on the CPU. Timings only: correctness of both is tested
elsewhere (the fused op's exactness: see the developers' notes; it is not used by the runtime)."""

from __future__ import annotations

import torch

from sp.kernels import TorchKernel
from trainer.profile import best_time


def run(head_dims: list[int], keys_list: list[int], heads: int = 8, rows: int = 512, reps: int = 3) -> list[dict]:
    torch.manual_seed(0)
    fused_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    fused_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    ours = TorchKernel()
    out = []
    for d in head_dims:
        for nk in keys_list:
            for causal in (True, False):
                if causal and nk != rows:
                    continue  # a causal pair of the ring is a diagonal block: rows == keys
                q, dout = torch.randn(rows, heads, d), torch.randn(rows, heads, d)
                k, v = torch.randn(nk, heads, d), torch.randn(nk, heads, d)
                scale = d**-0.5

                def reference(q=q, k=k, v=v, dout=dout, causal=causal, scale=scale) -> None:
                    o, lse = ours.forward(q, k, v, 0, 0, causal, scale)
                    ours.backward(dout, q, k, v, o, lse, 0, 0, causal, scale)

                # [tokens, heads, d] -permute-> [1, heads, tokens, d]: the op's layout
                qb, kb, vb, db = (t.permute(1, 0, 2).unsqueeze(0).contiguous() for t in (q, k, v, dout))

                def fused(qb=qb, kb=kb, vb=vb, db=db, causal=causal, scale=scale) -> None:
                    o, lse = fused_fwd(qb, kb, vb, 0.0, causal, scale=scale)
                    fused_bwd(db, qb, kb, vb, o, lse, 0.0, causal, scale=scale)

                t_ref, t_fused = best_time(reference, reps), best_time(fused, reps)
                out.append({"bench": "cpu_kernel", "head_dim": d, "heads": heads, "rows": rows, "keys": nk,
                            "causal": causal, "reference_ms": t_ref * 1e3, "fused_ms": t_fused * 1e3,
                            "fused_speedup": t_ref / t_fused, "threads": torch.get_num_threads()})  # fmt: skip
    return out
