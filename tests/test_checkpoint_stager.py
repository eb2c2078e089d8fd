"""Asynchronous checkpoints stage into the same host buffers every save (one stager per run, pinned on CUDA),
not into fresh memory per save; the saved checkpoints still load back exactly."""

from __future__ import annotations

import torch

from tests.dist import run_distributed


def _worker(rank, world, tmp):
    from torch.utils._pytree import tree_leaves

    from trainer.checkpoint import Saver

    model = torch.nn.Linear(64, 32)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    saver = Saver(tmp, asynchronous=True)
    stager, inner = saver.stager, saver.stager._state_dict_stager.stage
    staged, held = [], []

    def spy(state_dict, **kw):
        out = inner(state_dict, **kw)
        held.append(out)  # kept alive: a fresh buffer per save could not reuse a freed address
        staged.append(sorted(t.untyped_storage().data_ptr() for t in tree_leaves(out) if torch.is_tensor(t)))
        return out

    saver.stager._state_dict_stager.stage = spy
    for step in (1, 2, 3):
        model(torch.randn(4, 64)).sum().backward()
        optim.step()
        saver.save(step, model, optim, {"loader": {}})
        saver.wait()
    same = saver.stager is stager
    saver.close()
    return same, staged


def test_async_saves_reuse_their_staging_buffers(tmp_path):
    ((same, staged),) = run_distributed(_worker, 1, str(tmp_path), timeout=120)
    assert same and len(staged) == 3 and staged[0]
    assert staged[1] == staged[0] and staged[2] == staged[0]  # the same host storages every save
