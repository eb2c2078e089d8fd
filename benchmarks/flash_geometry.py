"""``sp-bench flash-geometry``: the host side of the flash ring step on the CPU (no GPU needed).

For one long causal document sharded over a ring of r ranks (zigzag), every ring step's pairs are turned
into flash varlen calls and their gather indices exactly as :class:`sp.kernels.FlashKernel` does on CUDA.
Reported per case: kernel calls per step, host time to build the pairs and indices, and the bytes the
``index_select`` gathers would allocate for q/k/v in bf16 (llama3-8b heads: 32 q, 8 kv, head dim 128).
A run of consecutive rows is taken as a view (no gather). ``tile_rows=512`` is the old geometry (512-row
query tiles, each with its own key prefix: the gathered keys grow with the square of the local length);
``None`` is the fused kernels' (whole pairs, unmasked pairs that share their keys or queries joined into one
varlen entry, as the ring calls them).
"""

from __future__ import annotations

import time

HEADS, KV_HEADS, DIM, BYTES = 32, 8, 128, 2


def case(tokens: int, r: int, tile: int | None) -> dict:
    import sp
    from sp.kernels import TorchFlashKernel, flash_calls
    from sp.ring import _rows, block_pairs, step_pairs

    layout = sp.GroupLayout.build([0, tokens], 1, r)
    ctx = sp.SPContext(layout, 0, ring_global_ranks=tuple(range(r)), kernel="torch")
    kernel = TorchFlashKernel(half_only=False)
    t0 = time.perf_counter()
    calls = q_rows = k_rows = 0
    for step in range(r):
        src = (0 - step) % r
        pairs = _rows(block_pairs(ctx, src, tile)) if tile else step_pairs(ctx, src, kernel)
        for call in kernel.pack_step(pairs).calls:
            q_rows += call.q.host_index.numel() if call.q.host_index is not None else 0  # a slice: no gather
            k_rows += call.k.host_index.numel() if call.k.host_index is not None else 0
        calls += sum(len(flash_calls(nq, nk, qp, kp, m)) for _, nq, _, nk, qp, kp, m in pairs)
    host_s = time.perf_counter() - t0
    gathered = (q_rows * HEADS * 2 + k_rows * KV_HEADS * 2) * DIM * BYTES  # q + dout, k + v per pass
    return {"bench": "flash_geometry", "tokens": tokens, "ring": r, "local_tokens": layout.local_tokens,
            "tile_rows": tile, "flash_calls": calls, "host_index_s": round(host_s, 4),
            "gathered_rows_q": q_rows, "gathered_rows_k": k_rows,
            "gathered_gib_bf16": round(gathered / 2**30, 3)}  # fmt: skip


def run(tokens: list[int], rings: list[int]) -> list[dict]:
    return [case(t, r, tile) for t in tokens for r in rings for tile in (512, None)]
