"""cuDNN's fused attention on CUDA in varlen form: ``aten::_cudnn_attention_forward`` / ``_backward``.

The published 1M-token Qwen3-8B run on one 8xH100 node took 373 s per step with torch's SDPA on cuDNN against
606 s on its flash path, so this kernel is measured beside the flash ones (``sp-bench gpu``) and the trainer
takes the fastest exact one. Conventions, read from torch 2.13's sources (``aten/src/ATen/native/cudnn/MHA.cpp``,
``run_cudnn_SDP_fprop_nestedtensor``): packed ``[total, heads, head_dim]`` inputs with ``cum_seq_q/k``; the
causal mask is cudnn-frontend's ``set_causal_mask``, aligned top-left (row i of an entry sees key j <= i of
the entry), so pairs are cut as for torch's CPU op (:func:`sp.kernels.varlen.top_left_calls`); the
log-sum-exp is fp32 ``[total_q, heads, 1]``; no GQA in the varlen path (``torch.nn.attention.varlen`` refuses
it), so kv heads are repeated to the query heads and their gradients summed back over each group; the
backward takes the forward's philox seed and offset and an undefined ``attn_bias`` (None).
"""

from __future__ import annotations

import functools

import torch

from sp.kernels.varlen import Call, VarlenCall, VarlenKernel, top_left_calls


class CudnnKernel(VarlenKernel):
    """``aten::_cudnn_attention_forward/_backward`` (varlen, with lse)."""

    name = "cudnn"

    def __init__(self, half_only: bool = True) -> None:
        self.half_only = half_only
        self._fwd = torch.ops.aten._cudnn_attention_forward.default
        self._bwd = torch.ops.aten._cudnn_attention_backward.default

    def calls(self, nq: int, nk: int, q_pos: int, k_pos: int, mask: bool) -> list[Call]:
        return top_left_calls(nq, nk, q_pos, k_pos, mask)

    @staticmethod
    def _heads(t: torch.Tensor, g: int) -> torch.Tensor:
        # [n, hk, d] -repeat_interleave-> [n, hk * g, d]: query head h uses kv head h // g
        return t.repeat_interleave(g, dim=1) if g > 1 else t

    def op_forward(self, q, k, v, call: VarlenCall, scale: float):
        g = q.shape[1] // k.shape[1]
        res = self._fwd(q, self._heads(k, g), self._heads(v, g), None, call.cu_q, call.cu_k, call.max_q, call.max_k,
                        True, 0.0, call.causal, False, scale=scale)  # fmt: skip
        out, lse = res[0], res[1]
        # [n, h, 1] -reshape-> [n, h] -transpose-> [h, n]
        return out, lse.reshape(lse.shape[0], lse.shape[1]).T

    def op_backward(self, dout, q, k, v, out, lse, call: VarlenCall, scale: float):
        h, hk = q.shape[1], k.shape[1]
        g = h // hk
        seed, offset = _no_dropout(q.device)  # the philox state is read only at dropout > 0
        # lse [h, n] -transpose-> [n, h] -unsqueeze-> [n, h, 1] (cuDNN's stats layout)
        stats = lse.T.unsqueeze(-1).contiguous()
        dq, dk, dv = self._bwd(dout, q, self._heads(k, g).contiguous(), self._heads(v, g).contiguous(), out, stats,
                               seed, offset, None, call.cu_q, call.cu_k, call.max_q, call.max_k, 0.0, call.causal,
                               scale=scale)  # fmt: skip
        if g == 1:
            return dq, dk, dv
        n, d = dk.shape[0], dk.shape[2]
        # [n, h, d] -view-> [n, hk, g, d] -sum in fp32-> [n, hk, d]: gradients back onto the shared kv heads
        return dq, dk.float().view(n, hk, g, d).sum(2), dv.float().view(n, hk, g, d).sum(2)


@functools.cache
def _no_dropout(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros((), dtype=torch.int64, device=device), torch.zeros((), dtype=torch.int64, device=device)
