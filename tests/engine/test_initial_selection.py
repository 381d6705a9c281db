"""Epoch 0 (the GLM base term) competes with the trained epochs on the same selection score.

With a small validation set the run selects on validation loss (``resolve_select_metric``); the
initial model must be scored the same way, or (scored on -AUROC, always below any loss) it wins
every run and the fused model never ships (measured in benchmarks/few_labels.py: every fusion
and clinical-only run returned the GLM, although the pretrained fusion's validation loss fell
from 0.555 to 0.384)."""

from types import SimpleNamespace

import torch

from mmai.engine import loop
from mmai.engine.distributed import DistInfo
from mmai.engine.state import TrainState


def _engine(select_metric: str) -> SimpleNamespace:
    model = torch.nn.Linear(2, 1)
    return SimpleNamespace(val_loader=[object()], raw=SimpleNamespace(glm=object()), kind="binary",
                           select_metric=select_metric, eval_model=model, info=DistInfo(),
                           config=SimpleNamespace(train=SimpleNamespace(select_metric="auto", patience=5)))


def test_initial_glm_is_scored_like_the_epochs(monkeypatch):
    monkeypatch.setattr(loop, "validate", lambda eng: {"val_loss": 0.555, "val_auroc": 0.78})
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
