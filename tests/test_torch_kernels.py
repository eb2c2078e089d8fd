"""torch's own CUDA attention kernels (aten flash varlen, cuDNN varlen) through sp.attention under every
strategy, against the float64 reference: the real kernel classes drive CPU kernels registered on the real
aten operators (:mod:`tests.aten_standins`), so the call geometry (bottom-right vs top-left causal alignment,
GQA, lse layouts, joined ring pairs, the micro-step's packed tables) is what runs on a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.dist import prepared_pool, run_distributed
from tests.reference import reference_attention
from tests.test_sp_attention import HEADS, _inputs

KERNELS = ("torch_flash_cpu", "cudnn_cpu")
SHAPES = [(1, 1), (2, 1), (1, 2), (4, 1), (1, 4), (2, 2)]
CASES = [(kernel, u, r, batch, causal, heads, dtype)
         for kernel in KERNELS for u, r in SHAPES for batch in ("long_tail", "single_long", "many_short", "odd")
         for causal in (True, False) for heads in HEADS
         for dtype in (("float32", "bfloat16") if causal and heads == "gqa" else ("float32",))]  # fmt: skip


def _worker(rank, world):
    import sp
    from tests import aten_standins

    aten_standins.register()
    pool = prepared_pool(world)
    results = {}
    for case in CASES:
        kernel, u, r, batch, causal, heads, dtype = case
        ranks = tuple(range(u * r))
        if rank not in ranks:
            continue
        cu, (q, k, v, do) = _inputs(batch, heads, dtype)
        ctx = pool.context(ranks, u, r, cu, causal=causal, kernel=kernel, check=False)
        ql, kl, vl = (sp.shard(x, ctx.layout, ctx.rank).requires_grad_() for x in (q, k, v))
        out = sp.attention(ql, kl, vl, ctx)
        out.backward(sp.shard(do, ctx.layout, ctx.rank))
        results[case] = [x.detach() for x in (out, ql.grad, kl.grad, vl.grad)] + [ctx.tables.builds]
    return results


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_worker, 4, timeout=600)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_torch_kernels_match_the_float64_reference(runs, case):
    import sp

    kernel, u, r, batch, causal, heads, dtype = case
    cu, (q, k, v, do) = _inputs(batch, heads, dtype)
    layout = sp.GroupLayout.build(cu, u, r)
    per_rank = [runs[g][case] for g in range(u * r)]
    assert all(p[4] == 1 for p in per_rank), "the micro-step's tables are built and uploaded once"
    got = [sp.unshard([p[i] for p in per_rank], layout).double() for i in range(4)]
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = reference_attention(q64, k64, v64, cu, causal)
    ref.backward(do.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, (ref, q64.grad, k64.grad, v64.grad)):
        scale = b.abs().max().item()
        err = (a - b).abs().max().item() / max(scale, 1e-12)
        tol = 2e-6 if dtype == "float32" else 2e-2  # fp32 lse of the ops; bf16 inputs and outputs
        assert err <= tol, f"{name} max relative error {err:.3e} > {tol}"


def test_aten_schemas_are_the_ones_the_kernels_call():
    """The kernels call these four ops positionally and by these keyword names: a change in torch's schemas
    shows here before any GPU run."""
    want = {
        "_flash_attention_forward": "(Tensor query, Tensor key, Tensor value, Tensor? cum_seq_q, Tensor? cum_seq_k, "
        "SymInt max_q, SymInt max_k, float dropout_p, bool is_causal, bool return_debug_mask, *, float? scale=None",
        "_flash_attention_backward": "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
        "Tensor logsumexp, Tensor cum_seq_q, Tensor cum_seq_k, SymInt max_q, SymInt max_k, float dropout_p, "
        "bool is_causal, Tensor rng_state, Tensor unused, *, float? scale=None",
        "_cudnn_attention_forward": "(Tensor query, Tensor key, Tensor value, Tensor? attn_bias, Tensor? cum_seq_q, "
        "Tensor? cum_seq_k, SymInt max_q, SymInt max_k, bool compute_log_sumexp, float dropout_p=0., "
        "bool is_causal=False, bool return_debug_mask=False, *, float? scale=None) -> (Tensor output, "
        "Tensor logsumexp, Tensor cum_seq_q, Tensor cum_seq_k, SymInt max_q, SymInt max_k, Tensor philox_seed, "
        "Tensor philox_offset, Tensor debug_attn_mask)",
        "_cudnn_attention_backward": "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
        "Tensor logsumexp, Tensor philox_seed, Tensor philox_offset, Tensor attn_bias, Tensor cum_seq_q, "
        "Tensor cum_seq_k, SymInt max_q, SymInt max_k, float dropout_p, bool is_causal, *, float? scale=None) "
        "-> (Tensor, Tensor, Tensor)",
    }
    for name, sig in want.items():
        schema = str(getattr(torch.ops.aten, name).default._schema)
        assert sig in schema, (name, schema)


def test_one_long_sequence_needs_no_gather_and_one_call_per_step():
    """Joined ring pairs: a zigzag step after the first is one unmasked varlen entry whose rows and keys are
    slices of the local buffers (no index_select, no index_add_); at r = 1 one causal call covers everything."""
    import sp
    from sp.kernels import CudnnKernel, TorchFlashKernel
    from sp.ring import step_pairs

    for kernel in (TorchFlashKernel(half_only=False), CudnnKernel(half_only=False)):
        for r in (2, 4):
            for rank in range(r):
                ctx = sp.SPContext(sp.GroupLayout.build([0, 4096], 1, r), rank, ring_global_ranks=tuple(range(r)))
                for src in range(r):
                    calls = kernel.pack_step(step_pairs(ctx, src, kernel)).calls
                    assert all(c.q.span is not None and c.k.span is not None for c in calls), (r, rank, src)
                    if src != rank:
                        assert len(calls) == 1 and len(calls[0].entries) == 1 and not calls[0].causal
        one = sp.SPContext(sp.GroupLayout.build([0, 4096], 1, 1), 0)
        (call,) = kernel.pack_step(step_pairs(one, 0, kernel)).calls
        assert call.causal and call.q.covers(4096) and call.k.covers(4096)


def test_no_ring_single_call_results_are_the_ops_own():
    """r = 1, one unpadded sequence: the forward returns the op's output and the backward the op's gradients
    (no fp32 accumulator, no copy): the same storages the op call produced."""
    import sp
    from sp.kernels import TorchFlashKernel
    from sp.ring import ring_backward, ring_forward
    from tests import aten_standins

    aten_standins.register()
    kernel = TorchFlashKernel(half_only=False)
    made = {}
    fwd, bwd = kernel.op_forward, kernel.op_backward
    kernel.op_forward = lambda *a: made.setdefault("fwd", fwd(*a))  # type: ignore[method-assign]
    kernel.op_backward = lambda *a: made.setdefault("bwd", bwd(*a))  # type: ignore[method-assign]
    ctx = sp.SPContext(sp.GroupLayout.build([0, 96]), 0, kernel="torch_flash_cpu")
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(96, h, 16, generator=g).bfloat16() for h in (4, 2, 2, 4))
    out, lse = ring_forward(q, k, v, ctx, kernel, 0.25)
    assert out.dtype == torch.bfloat16 and out.data_ptr() == made["fwd"][0].data_ptr()
    grads = ring_backward(do, q, k, v, out, lse, ctx, kernel, 0.25)
    assert [x.data_ptr() for x in grads] == [x.data_ptr() for x in made["bwd"]]
