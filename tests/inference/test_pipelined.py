"""Pipelined batch prediction: worker processes load the next studies while the model runs; the
predictions CSV and the errors file are the ones of the in-place run."""

from __future__ import annotations

import pandas as pd
import pytest

from mmai.inference.pipelined import PrefetchLoader, default_workers
from tests.inference.predict_world import world  # noqa: F401 - the shared fixture


@pytest.mark.slow
def test_workers_give_the_in_place_predictions_and_errors(world, tmp_path):  # noqa: F811
    man = world.broken_manifest(tmp_path, {1, 5}, raw=True)
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert world.predict(one, "--manifest", man, "--workers", "1") == 0
    assert world.predict(two, "--manifest", man, "--workers", "2") == 0
    assert two.read_bytes() == one.read_bytes()
    assert (tmp_path / "two.errors.csv").read_bytes() == (tmp_path / "one.errors.csv").read_bytes()
    assert len(pd.read_csv(two)) == 22


def test_prefetch_answers_by_path_whatever_the_order(world):  # noqa: F811
    from mmai.inference.predictor import Predictor

    pred = Predictor(world.run)
    m = pd.read_csv(world.cohort / "manifest.csv", dtype=str)
    paths = [str(world.cohort / p) for p in m["image"][:4]]
    pre = PrefetchLoader(pred.loader, paths, workers=2, ahead=4)
    try:
        for p in reversed(paths):  # asked for in another order than loaded
            arr, aff = pre.load(p)
            ref, ref_aff = pred.loader.load(p)
            assert arr.shape == ref.shape and (arr == ref).all() and (aff == ref_aff).all()
        assert not pre.futures
    finally:
        pre.close()
    assert 1 <= default_workers() <= 8
