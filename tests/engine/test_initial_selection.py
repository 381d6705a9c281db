"""Epoch 0 (the GLM base term) competes with the trained epochs on the same selection score.

With a small validation set the run selects on validation loss (``resolve_select_metric``); the
initial model must be scored the same way, or (scored on -AUROC, always below any loss) it wins
every run and the fused model never ships (measured in benchmarks/few_labels.py: every fusion
and clinical-only run returned the GLM, although the pretrained fusion's validation loss fell
from 0.555 to 0.384)."""

from types import SimpleNamespace

import numpy as np
import torch

from mmai.engine import loop
from mmai.engine.distributed import DistInfo
from mmai.engine.glm_guard import clears_initial, outputs_doc
from mmai.engine.state import TrainState
from mmai.models.heads import task_loss


def _engine(select_metric: str) -> SimpleNamespace:
    model = torch.nn.Linear(2, 1)
    return SimpleNamespace(val_loader=[object()], raw=SimpleNamespace(glm=object()), kind="binary",
                           select_metric=select_metric, eval_model=model, info=DistInfo(),
                           config=SimpleNamespace(train=SimpleNamespace(select_metric="auto", patience=5)))


def test_initial_glm_is_scored_like_the_epochs(monkeypatch):
    monkeypatch.setattr(loop, "validate_outputs", lambda eng: ({"val_loss": 0.555, "val_auroc": 0.78}, None, {}))
    for select, better_epoch in (("loss", {"val_loss": 0.384, "val_auroc": 0.70}),
                                 ("auto", {"val_loss": 0.60, "val_auroc": 0.91})):
        eng, state = _engine(select), TrainState()
        loop.validate_initial_model(eng, state)
        assert state.best_epoch == 0 and state.initial == {"epoch": 0, "val_loss": 0.555, "val_auroc": 0.78}
        loop.keep_best_and_check_stop(eng, state, {"epoch": 1, **better_epoch})
        assert state.best_epoch == 1, (select, state.best_score)
        # an epoch worse than the GLM on the run's score keeps epoch 1 (and counts a bad epoch)
        loop.keep_best_and_check_stop(eng, state, {"epoch": 2, "val_loss": 0.9, "val_auroc": 0.5})
        assert state.best_epoch == 1 and state.bad_epochs == 1


def _binary_outputs(rng: np.random.Generator, y: np.ndarray, signal: float) -> torch.Tensor:
    """(N, 1) logits carrying ``signal`` x the label plus unit noise."""
    return torch.tensor((signal * (2 * y - 1) + rng.normal(size=len(y)))[:, None], dtype=torch.float32)


def _guarded(monkeypatch, select: str, glm_signal: float, epoch_signal: float, n: int = 60) -> TrainState:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    targets = {"target": torch.tensor(y, dtype=torch.float32)}
    glm = _binary_outputs(rng, y, glm_signal)
    monkeypatch.setattr(loop, "validate_outputs",
                        lambda eng: ({"val_loss": float(task_loss("binary", glm, targets))}, glm, targets))
    eng, state = _engine(select), TrainState()
    eng.classes = ["0", "1"]
    loop.validate_initial_model(eng, state)
    if epoch_signal:  # the trained epoch: more of the label's signal than the GLM
        out = glm + torch.tensor(epoch_signal * (2 * y - 1)[:, None], dtype=torch.float32)
    else:  # the trained epoch: the GLM's outputs plus noise that happens to lower the loss (chance)
        base = float(task_loss("binary", glm, targets))
        while True:  # lower by chance, by less than the paired SE (about 0.02 here)
            out = glm + 0.5 * torch.tensor(rng.normal(size=(n, 1)), dtype=torch.float32)
            if base - 0.015 < float(task_loss("binary", out, targets)) < base:
                break
    row = {"epoch": 1, "val_loss": float(task_loss("binary", out, targets))}
    loop.keep_best_and_check_stop(eng, state, row, out, targets)
    return state


def test_an_epoch_must_beat_the_glm_significantly(monkeypatch):
    """The significance rule (mmai.engine.glm_guard): an epoch whose validation loss is lower than the
    GLM's by less than the paired bootstrap SE leaves the GLM shipped; a clear gain replaces it."""
    chance = _guarded(monkeypatch, "loss", glm_signal=0.8, epoch_signal=0.0)
    assert chance.best_epoch == 0 and chance.bad_epochs == 0  # still improving: no early-stopping count
    assert chance.history == [] and chance.raw_best < chance.best_score
    clear = _guarded(monkeypatch, "loss", glm_signal=0.8, epoch_signal=0.8)
    assert clear.best_epoch == 1


def test_clears_initial_reports_the_difference_and_its_se():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 80)
    targets = {"target": torch.tensor(y, dtype=torch.float32)}
    glm = _binary_outputs(rng, y, 0.5)
    same = clears_initial("binary", "loss", ["0", "1"], glm, targets, outputs_doc(glm))
    assert same == (False, 0.0, 0.0)
    better = _binary_outputs(rng, y, 3.0)
    clears, diff, se = clears_initial("binary", "auto", ["0", "1"], better, targets, outputs_doc(glm))
    assert clears and diff < -se < 0  # minus AUROC: a much better ranking


def test_later_looks_must_clear_a_bonferroni_threshold():
    """Each validated epoch is one more look at the same validation cases: epoch m must clear the
    one-sided 5 / m % level. A gain of ~2.4 SEs clears at the first look, not at the tenth."""
    from mmai.engine.glm_guard import z_threshold

    assert [round(z_threshold(m), 3) for m in (1, 2, 10, 24)] == [1.645, 1.96, 2.576, 2.865]
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 80)
    targets = {"target": torch.tensor(y, dtype=torch.float32)}
    glm = _binary_outputs(rng, y, 0.5)
    out = glm + torch.tensor((0.2 * (2 * y - 1) + 0.6 * np.random.default_rng(0).normal(size=80))[:, None],
                             dtype=torch.float32)
    first = clears_initial("binary", "loss", ["0", "1"], out, targets, outputs_doc(glm), looks=1)
    tenth = clears_initial("binary", "loss", ["0", "1"], out, targets, outputs_doc(glm), looks=10)
    assert 1.645 < -first[1] / first[2] < 2.576
    assert first[0] and not tenth[0]
