"""Mixture-of-experts models (Qwen3-MoE, Mixtral) against transformers, the independent reference, on tiny
perturbed models: per-token losses under every SP strategy on 1, 2 and 4 ranks and across groups; gradients
of the summed loss with the load-balancing loss (transformers with ``output_router_logits=True``) under
every strategy; the aux loss value; the FSDP-sharded load bit-exact and rank-local; export to transformers
with no missing or unexpected keys; and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist import prepared_pool, run_distributed
from tests.test_hf_interop import LENGTHS, SHAPES, _docs, _group_losses, _plain_model

KINDS = ["qwen3_moe", "mixtral"]
TOL = 1e-5
GROUPS = {  # every rank takes part; the last case has two groups in one micro-step (the aux loss spans both)
    "u4r1": [((0, 1, 2, 3), 4, 1, [0, 1, 2, 3])],
    "u1r4": [((0, 1, 2, 3), 1, 4, [0, 1, 2, 3])],
    "u2r2": [((0, 1, 2, 3), 2, 2, [0, 1, 2, 3])],
    "two_groups": [((0, 1), 2, 1, [0, 1, 3]), ((2, 3), 1, 2, [2])],
}


def _worker(rank, world, folders):
    import torch.distributed as dist
    from megatron.core import parallel_state

    import sp
    from models import moe
    from models.attention import SPPackedSeqParams

    parallel_state.initialize_model_parallel(1, 1)
    pool = prepared_pool(world)
    docs = _docs()
    n = sum(len(d) - 1 for d in docs)
    out = {}
    for kind in KINDS:
        model, _ = _plain_model(folders[kind])
        for u, r in SHAPES:  # losses, forward only
            ranks = (0,) if u * r == 1 else tuple(range(u * r))
            mine = {}
            if rank in ranks:
                with torch.no_grad():
                    loss, keep, doc, pos = _group_losses(model, pool, ranks, u, r, docs, rank)
                mine = {(d, p): v for v, d, p in zip(loss[keep].tolist(), doc.tolist(), pos.tolist())}
            got = [None] * world
            dist.all_gather_object(got, mine)
            out[(kind, f"u{u}r{r}")] = {k: v for part in got for k, v in part.items()}
        for name, groups in GROUPS.items():  # gradients of sum(loss) / n + coef aux, aux over every rank
            model.zero_grad()
            for ranks, u, r, seqs in groups:
                if rank not in ranks:
                    continue
                sel = [docs[s] for s in seqs]
                cu = [0]
                for d in sel:
                    cu.append(cu[-1] + len(d) - 1)
                ctx = pool.context(ranks, u, r, cu, check=False)
                tok = sp.shard(torch.cat([d[:-1] for d in sel]), ctx.layout, ctx.rank)
                lab = sp.shard(torch.cat([d[1:] for d in sel]), ctx.layout, ctx.rank)
                step = moe.begin(model, ctx.tables.valid_rows, 1.0)
                loss = model(tok[None], None, None, labels=lab[None],
                             packed_seq_params=SPPackedSeqParams(qkv_format="sbhd", sp_ctx=ctx))[0]  # fmt: skip
                moe.finish(step)
                (loss[ctx.layout.token_index(ctx.rank) >= 0].sum() / n).backward()
            moe.end(model)
            g = {}
            for pname, p in model.named_parameters():
                t = p.grad if p.grad is not None else torch.zeros_like(p)
                dist.all_reduce(t)
                g[pname] = t.clone()
            out[(kind, name, "grads")] = g
            out[(kind, name, "aux")] = float(step.aux)
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tests.hf_models import make_folders

    return make_folders(tmp_path_factory.mktemp("moe"), KINDS, sharded="qwen3_moe")


@pytest.fixture(scope="module")
def distributed(folders):
    return run_distributed(_worker, 4, {k: str(v) for k, v in folders.items()}, timeout=600)[0]


def _reference(folder):
    """transformers' model, and its loss of the documents as one right-padded batch: mean token loss plus
    ``router_aux_loss_coef`` x the aux loss over the batch's tokens (``output_router_logits=True``)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    docs = _docs()
    width = max(len(d) - 1 for d in docs)
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d) - 1], mask[i, : len(d) - 1] = d[:-1], 1
    res = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    ce = sum(torch.nn.functional.cross_entropy(res.logits[i, : len(d) - 1], d[1:], reduction="sum")
             for i, d in enumerate(docs))  # fmt: skip
    per_token = [torch.nn.functional.cross_entropy(res.logits[i, : len(d) - 1], d[1:], reduction="none")
                 for i, d in enumerate(docs)]  # fmt: skip
    total = ce / sum(len(d) - 1 for d in docs) + model.config.router_aux_loss_coef * res.aux_loss
    return model, per_token, res.aux_loss, total


def _grad(model, name):
    """The gradient of a checkpoint tensor in transformers' in-memory model, whose experts are fused:
    ``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first) and ``mlp.experts.down_proj`` [E, H, I], and
    Mixtral's ``block_sparse_moe`` is ``mlp`` (w1 gate, w3 up, w2 down)."""
    import re

    params = dict(model.named_parameters())
    name = name.replace("block_sparse_moe.", "mlp.")
    m = re.match(r"(.*mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$", name)
    if m is None:
        return params[name].grad
    base, e, kind = m.group(1), int(m.group(2)), m.group(3)
    if kind in ("down_proj", "w2"):
        return params[f"{base}.down_proj"].grad[e]
    fused = params[f"{base}.gate_up_proj"].grad[e]  # [2I, H]
    half = fused.shape[0] // 2
    return fused[:half] if kind in ("gate_proj", "w1") else fused[half:]


@pytest.mark.parametrize("kind", KINDS)
def test_losses_equal_transformers_under_every_strategy(kind, folders, distributed):
    _, ref, _, _ = _reference(folders[kind])
    for u, r in SHAPES:
        got = distributed[(kind, f"u{u}r{r}")]
        assert len(got) == sum(n - 1 for n in LENGTHS)
        err = max(abs(got[(d, p)] - float(ref[d][p].detach())) for d, p in got)
        assert err < TOL, (kind, u, r, err)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_with_the_aux_loss_equal_transformers(kind, folders, distributed):
    from models.hf.export import split
    from tests.test_hf_interop import _shape

    model, _, aux, total = _reference(folders[kind])
    total.backward()
    shape = _shape(folders[kind])
    assert shape.router_aux_loss_coef == 0.05
    for name in GROUPS:
        got = distributed[(kind, name, "aux")]
        assert abs(got - float(aux.detach())) < 1e-6, (name, got, aux)
        for ours, t in distributed[(kind, name, "grads")].items():
            for hf, part in split(ours, t, shape).items():
                ref_grad = _grad(model, hf)
                err = float((part - ref_grad).abs().max() / ref_grad.abs().max())
                assert err < TOL, (kind, name, ours, hf, err)


def test_the_aux_loss_moves_the_router_gradient(folders, distributed):
    """The load-balancing term is not negligible here: without it the router gradients differ."""
    from models.hf.export import split
    from tests.test_hf_interop import _shape

    model, per_token, _, _ = _reference(folders["mixtral"])
    (sum(p.sum() for p in per_token) / sum(n - 1 for n in LENGTHS)).backward()
    shape = _shape(folders["mixtral"])
    ours = distributed[("mixtral", "u4r1", "grads")]["decoder.layers.0.mlp.router.weight"]
    (hf, part), = split("decoder.layers.0.mlp.router.weight", ours, shape).items()  # fmt: skip
    lm_only = _grad(model, hf)
    assert float((part - lm_only).abs().max() / lm_only.abs().max()) > 1e-3


@pytest.mark.parametrize("kind", ["qwen3_moe", pytest.param("mixtral", marks=pytest.mark.slow)])  # one is fast
def test_fsdp_sharded_load_is_bit_exact_and_rank_local(kind, folders):
    from tests.test_hf_interop import test_fsdp_sharded_load_is_bit_exact_and_rank_local as check

    check(kind, folders)


def _export_worker(rank, world, folder, out):
    from megatron.core import parallel_state
    from safetensors.torch import save_file

    from models.hf.config import read_config, to_hf_config
    from models.hf.export import split

    parallel_state.initialize_model_parallel(1, 1)
    model, shape = _plain_model(folder)
    tensors = {hf: t.contiguous() for ours, p in model.named_parameters() for hf, t in split(ours, p.detach(),
               shape).items()}  # fmt: skip
    save_file(tensors, Path(out) / "model.safetensors")
    (Path(out) / "config.json").write_text(json.dumps(to_hf_config(shape, read_config(folder))))


@pytest.mark.parametrize("kind", KINDS)
def test_export_loads_in_transformers_with_no_missing_keys(kind, folders, tmp_path):
    """Our tensors, split back to Hugging Face names with the exported config.json: transformers loads them
    strictly and gives the same logits."""
    import transformers

    from models.hf.config import read_config

    run_distributed(_export_worker, 1, str(folders[kind]), str(tmp_path), timeout=120)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == read_config(folders[kind])["architectures"]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True,
                                                                  attn_implementation="eager")  # fmt: skip
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref = transformers.AutoModelForCausalLM.from_pretrained(folders[kind], attn_implementation="eager")
    d = _docs()[-1]
    with torch.no_grad():
        assert torch.equal(hf(d[None, :-1]).logits, ref(d[None, :-1]).logits)


def test_unsupported_moe_configs_name_the_field(tmp_path):
    from models.hf.config import shape_fields
    from tests.hf_models import make

    make(tmp_path / "q", "qwen3_moe")
    base = json.loads((tmp_path / "q" / "config.json").read_text())
    cases = {"shared_expert_intermediate_size": 64, "router_jitter_noise": 0.1, "use_sliding_window": True,
             "layer_types": ["full_attention", "linear_attention"]}  # fmt: skip
    for key, value in cases.items():
        folder = tmp_path / key
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**base, key: value}))
        with pytest.raises(ValueError, match=f"{key}="):
            shape_fields(folder)
    folder = tmp_path / "mixtral_window"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**base, "architectures": ["MixtralForCausalLM"],
                                                    "sliding_window": 4096}))  # fmt: skip
    with pytest.raises(ValueError, match="sliding_window=4096"):
        shape_fields(folder)
    assert shape_fields(Path(tmp_path / "q"))["dense_layers"] == (0,)


def _trainer_job(out, hf, data, **over):
    from models.hf.config import shape_from_folder
    from planner.planner import PlannerConfig
    from planner.types import Cluster
    from trainer.config import DataConfig, TrainConfig
    from trainer.loop import TrainJob

    sharding = over.pop("sharding", "fsdp")
    return TrainJob(
        model=shape_from_folder(hf, bytes_per_value=4, **{"checkpointing": "full", **over}),
        cluster=Cluster(name="cpu", nodes=1, gpus_per_node=4, peak_tflops=0.05, mfu=1.0, memory_gib=4.0,
                        intra_gbs=1.0, inter_gbs=1.0, beta_ms=5.0),
        planner=PlannerConfig(use_milp=False),
        data=DataConfig(source="jsonl", path=data, max_len=512, tokens_per_step=1500, seed=1),
        train=TrainConfig(steps=2, out_dir=out, progress=False, warmup_steps=1, checkpoint_every=0, resume=False,
                          picture_every=0, precision="fp32", sharding=sharding, init_from=f"hf:{hf}"),
    )  # fmt: skip


MODES = {"none": {"checkpointing": "none"}, "offload": {"checkpointing": "offload"},
         "all_on": {"checkpointing": "offload", "loss_chunk_tokens": 64, "tile_tokens": 16},
         "replicate_all_on": {"checkpointing": "offload", "loss_chunk_tokens": 64, "tile_tokens": 16,
                              "sharding": "replicate"}}  # fmt: skip


def _trainer_worker(rank, world, hf, data, tmp):
    from trainer.loop import Trainer
    from trainer.sharding import full_state

    out = {}
    for name, kw in {"full": {}, **MODES}.items():
        tr = Trainer(_trainer_job(f"{tmp}/{name}", hf, data, **kw))
        out[name] = (tr.run(), full_state(tr.model), tr.last_values.get("train/moe_aux_loss"))
    return out if rank == 0 else None


def test_trainer_with_every_memory_technique_equals_the_plain_path(folders, tmp_path):
    """Through the real trainer (4 ranks, the adaptive planner): full checkpointing, none, offload, offload +
    chunked loss + tiled experts, and replicated training, equal in losses and weights (the aux loss's gradient
    is added once per backward whatever recomputes the routers); the aux loss is logged on its own."""
    import numpy as np

    data = tmp_path / "data.jsonl"
    rng = np.random.default_rng(0)
    data.write_text("".join(json.dumps({"text": " ".join(f"w{int(x)}" for x in rng.integers(0, 99, n))}) + "\n"
                            for n in rng.integers(20, 400, 24)))  # fmt: skip
    from tests.hf_models import make

    hf = tmp_path / "hf"
    make(hf, "qwen3_moe")
    res = run_distributed(_trainer_worker, 4, str(hf), str(data), str(tmp_path), timeout=900)[0]
    losses, params, aux = res["full"]
    assert aux is not None and aux > 0
    diffs = {}
    for name in MODES:
        l1, p1, a1 = res[name]
        diffs[name] = (
            max(abs(a - b) for a, b in zip(losses, l1)),
            abs(a1 - aux),
            max(float((params[k] - p1[k]).abs().max() / params[k].abs().max()) for k in params),
        )
    print(diffs)
    for name, (loss, aux_err, rel) in diffs.items():
        # weights after two AdamW steps, relative to each tensor's largest entry: summation-order rounding of
        # the tiled experts and the chunked loss, which Adam's normalisation amplifies on tiny gradients
        assert loss < 1e-6 and aux_err < 1e-6 and rel < 1e-5, (name, loss, aux_err, rel)


def _memory_worker(rank, world):
    """Bytes saved for backward by MoE models (one dense and one MoE layer) against the memory model."""
    import numpy as np
    from megatron.core import parallel_state

    from models.gpt import build_gpt
    from planner.cost import CostModel
    from planner.types import Assignment, Cluster, GroupShape, ModelShape
    from sp.groups import GroupPool
    from trainer.memory import SavedBytes
    from trainer.sharding import Regime, parallelize
    from trainer.step import group_pass

    parallel_state.initialize_model_parallel(1, 1)
    pool, rows = GroupPool(), []
    docs = [np.random.default_rng(0).integers(0, 100, size=257)]
    cases = [("fp32", 4, 2, 0, True, False, "none"), ("bf16", 8, 2, 0, True, True, "none"),
             ("bf16", 8, 4, 16, False, True, "none"), ("fp32", 8, 2, 16, False, False, "selective"),
             ("bf16", 4, 2, 0, True, True, "full")]  # fmt: skip
    for precision, experts, k, tile, norm, qk, ckpt in cases:
        shape = ModelShape(name="t", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=96, vocab=100,
                           checkpointing=ckpt, bytes_per_value=4 if precision == "fp32" else 2, experts=experts,
                           experts_per_token=k, expert_ffn=32, dense_layers=(0,), tile_tokens=tile,
                           norm_topk_prob=norm, qk_norm=qk)  # fmt: skip
        model = parallelize(build_gpt(shape, 1024), Regime("fsdp", precision, ckpt), torch.device("cpu"))
        with SavedBytes(model) as meter:
            group_pass(model, pool, Assignment(0, GroupShape(1, 1), (0,), 0, 0), docs, "cpu_fused",
                       torch.device("cpu"), meter=meter)  # fmt: skip
        rows.append((precision, experts, k, tile, norm, qk, ckpt, meter.bytes,
                     CostModel(Cluster(name="cpu"), shape).saved_bytes_per_token() * 256))  # fmt: skip
    return rows


def test_moe_saved_bytes_equal_the_memory_model():
    (rows,) = run_distributed(_memory_worker, 1, timeout=300)
    for *case, measured, predicted in rows:
        assert measured == predicted, (case, measured, predicted)


PUBLISHED = {  # config.json fields as published (transformers 4 layout); parameters in billions
    "Qwen2.5-7B": ({"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 28, "hidden_size": 3584,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
                    "vocab_size": 152064, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                    "use_sliding_window": False, "sliding_window": 131072}, 7.62),
    "Mistral-7B-v0.3": ({"architectures": ["MistralForCausalLM"], "num_hidden_layers": 32, "hidden_size": 4096,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                         "vocab_size": 32768, "rope_theta": 1e6, "sliding_window": None}, 7.25),
    "Qwen3-8B": ({"architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": 36, "hidden_size": 4096,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288,
                  "vocab_size": 151936, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                  "use_sliding_window": False, "sliding_window": None}, 8.19),
    "Qwen3-30B-A3B": ({"architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 48, "hidden_size": 2048,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
                       "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                       "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
                       "rope_theta": 1e6, "rms_norm_eps": 1e-6, "router_aux_loss_coef": 0.001,
                       "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": None}, 30.53),
    "Mixtral-8x7B": ({"architectures": ["MixtralForCausalLM"], "num_hidden_layers": 32, "hidden_size": 4096,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                      "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "rope_theta": 1e6,
                      "router_aux_loss_coef": 0.02, "sliding_window": None}, 46.70),
}  # fmt: skip


@pytest.mark.parametrize("name", PUBLISHED)
def test_sp_plan_from_a_published_config_json_alone(name, tmp_path):
    """A dry run from config.json alone (no weights): the parameter count matches the published one, and the
    plan's JSON breaks the step's FLOPs, the states and the memory down by term."""
    import subprocess
    import sys

    from tests.test_hf_interop import _shape

    cfg, billions = PUBLISHED[name]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert abs(_shape(tmp_path).params / 1e9 - billions) < 0.01, (name, _shape(tmp_path).params)
    res = subprocess.run([sys.executable, "-m", "cli.plan", "model=hf", f"model.hf_path={tmp_path}", "cluster=h100x64",
                          "cluster.nodes=2", "lengths.fixed=[131072]", "output.format=json", "output.baselines=false"],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    s = json.loads(res.stdout)["summary"]
    assert s["planned_step_s"] > 0 and s["parameters"]["total"] == _shape(tmp_path).params
    flops = s["flops_per_step"]
    assert abs(sum(v for k, v in flops.items() if k != "total") - flops["total"]) < 1e-6 * flops["total"]
    assert (flops["routed_experts"] > 0) == (name in ("Qwen3-30B-A3B", "Mixtral-8x7B"))
    assert abs(s["states_gib"]["total"] - s["memory_gib"]["states"]) < 1e-9
