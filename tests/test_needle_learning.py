"""The needle score measures something (:mod:`benchmarks.needle_learning`): a tiny model trained by the real
trainer on a mixture that includes retrieval examples (prompt/completion rows, the answer trained) goes from no
task right to well above chance at short lengths, while the same model before training is at chance or below.

The haystack is English text without digits, so the one-digit value is the only digit in a task: retrieving it
means finding it in the context, wherever the needle sits. A model that ignores the context can only guess the
digit, 1 in 10. Measured here (1 rank, ~0.4 s per step): 1 and 3 of the 40 tasks right at steps 60 and 120 of a
240-step run, all 40 at steps 180 and 240. At lr 3e-3 the same model stalls at 6 of 10 digits.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.needle_learning import TRAIN_LENGTHS, train_and_score

CHANCE = 0.1  # one digit, guessed


@pytest.mark.slow
def test_needle_accuracy_rises_above_chance_with_training(tmp_path):
    from tests.dist import run_distributed

    grids = run_distributed(train_and_score, 1, str(tmp_path), 300, TRAIN_LENGTHS, 1e-3, timeout=900)[0]
    before, after = grids[0], grids[-1]
    assert before["step"] == 0 and after["step"] == 300
    assert np.mean(before["accuracy"]) <= CHANCE, f"untrained: {before['accuracy']}"
    assert np.mean(after["accuracy"]) >= 0.8, f"trained 300 steps: {after['accuracy']}"
    assert min(min(row) for row in after["accuracy"]) >= 0.5, "at every length and depth"
    assert np.mean(after["logprob"]) > np.mean(before["logprob"]) + 3, "the answers' log-probability rises"
