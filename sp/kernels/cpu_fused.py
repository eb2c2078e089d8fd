"""Block kernel on torch's fused CPU attention: ``aten::_scaled_dot_product_flash_attention_for_cpu`` and its
``_backward``, which return and accept an external (out, lse), as a ring needs. ``sp-bench cpu-kernel``
measured it 1.2-6.7x faster than the reference :class:`sp.kernels.reference.TorchKernel` (fwd + bwd of a 512-row block
pair, head dim 32-128, 2 cores); the trainer uses it on the CPU (``kernel="auto"``).

Pairs go whole (``tile_rows = None``): the op works through its own blocks with per-thread buffers, so its
memory is linear in rows and keys (measured: an 8K x 8K full pair, forward + backward, grows the peak RSS by
137 MiB where one score matrix would be 2 GiB). A pair is one call, or two where an unmasked key prefix
precedes a causal diagonal; a single call's output, lse and gradients are returned as views of the op's
results, with no merge, no zero-filled buffer and no extra pass (in the op's dtype: bf16 for bf16 inputs,
which the ring widens exactly where it accumulates; GQA gradients are summed over their group in fp32).

Conventions differ from ours in two ways, both handled here:
- the op's causal mask is **top-left** aligned (query row i sees key j <= i of the call), ours is by
  position (a key is visible when its position <= the query's). :func:`topleft_calls` cuts a pair at any
  offsets into at most one unmasked call (keys before the queries' start) and one causal call whose first
  key has the first query's position; rows before the first key see nothing (out 0, lse -inf);
- GQA: the op wants as many kv heads as query heads; kv heads are repeated (query head h uses kv head
  h // g) and the kv gradients summed back over each group.
The backward of every call gets the pair's final (out, lse), so the calls' gradients simply add up.
"""

from __future__ import annotations

import torch

from sp.kernels.base import compute_dtype, lse_dtype
from sp.kernels.varlen import top_left_calls

topleft_calls = top_left_calls  # the calls of one (query block, key block) pair for a top-left causal kernel


class CpuFusedKernel:
    """Same interface as :class:`sp.kernels.reference.TorchKernel` (q [nq, h, d], k/v [nk, hk, d]; lse [h, nq])."""

    tile_rows: int | None = None  # the op blocks internally: its memory is linear in rows and keys

    def __init__(self) -> None:
        self._fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        self._bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    @staticmethod
    def _heads(t: torch.Tensor, g: int) -> torch.Tensor:
        # [n, hk, d] -repeat-> [n, hk * g, d] -permute-> [1, h, n, d]
        return (t.repeat_interleave(g, dim=1) if g > 1 else t).permute(1, 0, 2).unsqueeze(0)

    def _call(self, q, k, v, r0, r1, k0, k1, causal, scale):
        """One op call: (out [rows, h, d], lse [h, rows]) as views of its results."""
        g = q.shape[1] // k.shape[1]
        qc = q[r0:r1].permute(1, 0, 2).unsqueeze(0)  # [rows, h, d] -permute-> [1, h, rows, d]
        o, lse = self._fwd(qc, self._heads(k[k0:k1], g), self._heads(v[k0:k1], g), 0.0, causal, scale=scale)
        return o[0].permute(1, 0, 2), lse[0]  # [1, h, rows, d] -> [rows, h, d]; [1, h, rows] -> [h, rows]

    def forward(self, q, k, v, q_pos, k_pos, mask, scale):
        nq, h, d = q.shape
        calls = topleft_calls(nq, k.shape[0], q_pos, k_pos, mask)
        if len(calls) == 1 and calls[0][:2] == (0, nq):  # every row in one call: its result is the pair's
            o, part = self._call(q, k, v, *calls[0], scale)
            return o, part.to(lse_dtype(q.dtype))  # the op's output as is: widening it later is exact
        out = torch.zeros(nq, h, d, dtype=compute_dtype(q.dtype), device=q.device)
        lse = torch.full((h, nq), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        for r0, r1, k0, k1, causal in calls:
            o, part = self._call(q, k, v, r0, r1, k0, k1, causal, scale)
            part = part.to(lse.dtype)
            new = torch.logaddexp(lse[:, r0:r1], part)  # [h, rows]
            old_w = torch.exp(lse[:, r0:r1] - new).T.unsqueeze(-1)  # [h, rows] -T-> [rows, h, 1]
            new_w = torch.exp(part - new).T.unsqueeze(-1)
            out[r0:r1] = out[r0:r1] * old_w + o.to(out.dtype) * new_w
            lse[:, r0:r1] = new
        return out, lse

    def backward(self, dout, q, k, v, out, lse, q_pos, k_pos, mask, scale):
        nq, h, d = q.shape
        nk, hk = k.shape[0], k.shape[1]
        g = h // hk
        cd = compute_dtype(q.dtype)  # gradients are returned in it: the ring accumulates in fp32
        calls = topleft_calls(nq, nk, q_pos, k_pos, mask)
        grads = [self._call_backward(dout, q, k, v, out, lse, *c, scale) for c in calls]
        if len(calls) == 1 and calls[0][:4] == (0, nq, 0, nk):  # one call covers the pair: its gradients are it
            dq, dk, dv = grads[0]  # in the op's dtype (exact to widen; GQA sums below run in fp32)
        else:
            dq = torch.zeros(nq, h, d, dtype=cd, device=q.device)
            dk = torch.zeros(nk, h, d, dtype=cd, device=q.device)
            dv = torch.zeros(nk, h, d, dtype=cd, device=q.device)
            for (r0, r1, k0, k1, _), (gq, gk, gv) in zip(calls, grads, strict=True):
                dq[r0:r1] += gq
                dk[k0:k1] += gk
                dv[k0:k1] += gv
        if g == 1:
            return dq, dk, dv
        # [nk, h, d] -view-> [nk, hk, g, d] -sum-> [nk, hk, d]: GQA gradients back onto the shared kv heads
        return dq, dk.to(cd).reshape(nk, hk, g, d).sum(2), dv.to(cd).reshape(nk, hk, g, d).sum(2)

    def _call_backward(self, dout, q, k, v, out, lse, r0, r1, k0, k1, causal, scale):
        """One op backward call: (dq [rows, h, d], dk [keys, h, d], dv [keys, h, d]) as views."""
        g = q.shape[1] // k.shape[1]
        # [rows, h, d] -permute-> [1, h, rows, d], in q's dtype as the op wants; made contiguous: the op's
        # backward reads strided inputs 5-8% slower (bf16, 4K-16K rows, one process), and the world-4 fp32
        # calls of sp-bench attention --vs-single ran 3-8% faster with the copies than without (measured)
        do_c, q_c, o_c = (t[r0:r1].to(q.dtype).permute(1, 0, 2).unsqueeze(0).contiguous() for t in (dout, q, out))
        row_lse = lse[:, r0:r1].unsqueeze(0).to(lse_dtype(q.dtype))  # [h, rows] -> [1, h, rows]
        k_c, v_c = self._heads(k[k0:k1], g).contiguous(), self._heads(v[k0:k1], g).contiguous()
        gq, gk, gv = self._bwd(do_c, q_c, k_c, v_c, o_c, row_lse, 0.0, causal, scale=scale)
        return tuple(x[0].permute(1, 0, 2) for x in (gq, gk, gv))  # [1, h, n, d] -permute-> [n, h, d]
