"""Pipelined batch prediction: worker processes load the next studies while the model runs; the
predictions CSV and the errors file are the ones of the in-place run."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from mmai.config import load_config
from mmai.inference.pipelined import PrefetchLoader, default_workers, model_threads, predict_chunk
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


def test_prefetch_answers_by_path_whatever_the_order(world, monkeypatch):  # noqa: F811
    from mmai.inference import pipelined
    from mmai.inference.predictor import Predictor

    monkeypatch.setattr(pipelined, "runnable_now", lambda: 99)  # a busy machine: one model thread to the end
    pred = Predictor(world.run)
    m = pd.read_csv(world.cohort / "manifest.csv", dtype=str)
    paths = [str(world.cohort / p) for p in m["image"][:4]]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pre = PrefetchLoader(pred.loader, paths, workers=2, ahead=4, threads=1)
        try:
            for p in reversed(paths):  # asked for in another order than loaded
                arr, aff = pre.load(p)
                assert torch.get_num_threads() == 1  # the model leaves the cores to the workers
                ref, ref_aff = pred.loader.load(p)
                assert arr.shape == ref.shape and (arr == ref).all() and (aff == ref_aff).all()
            assert not pre.futures
        finally:
            pre.close()
        assert torch.get_num_threads() == 2  # given back when the workers stop
    finally:
        torch.set_num_threads(before)
    assert 1 <= default_workers() <= 8


def test_a_peeked_volume_is_the_one_the_model_gets_and_is_loaded_once(world):  # noqa: F811
    """The focal inventory peeks at each study's volume before the model: the model's load must
    get that same array (no second load or preprocessing), and only once."""
    from mmai.inference.predictor import Predictor

    pred = Predictor(world.run)
    m = pd.read_csv(world.cohort / "manifest.csv", dtype=str)
    paths = [str(world.cohort / p) for p in m["image"][:2]]
    pre = PrefetchLoader(pred.loader, paths, workers=1, ahead=2, threads=None)
    try:
        seen, _ = pre.peek(paths[0])
        assert pre.peek(paths[0])[0] is seen  # peeking again: the kept volume
        got, _ = pre.load(paths[0])
        assert got is seen and not pre._recent  # handed to the model, then forgotten
        again, _ = pre.load(paths[0])  # a later load reads the file again
        assert again is not seen and (again == seen).all()
    finally:
        pre.close()


def test_model_gets_the_cores_the_workers_leave():
    assert model_threads(2, cores=2) == 1  # 2 cores: two loading workers, the model on one thread
    assert model_threads(4, cores=2) == 1
    assert model_threads(8, cores=16) == 8
    assert model_threads(1, cores=1) == 1


def test_full_resolution_volumes_are_predicted_one_per_model_call():
    """image.size null (each study its own shape): one case per call, so the model runs on study k
    while the workers load the next ones; a fixed size keeps infer.batch_size."""
    full = load_config("pipelines/ct_chest.yaml")
    fixed = load_config("pipelines/demo.yaml")
    assert full.image.size is None and fixed.image.size is not None
    assert predict_chunk(SimpleNamespace(config=full, uses_image=True)) == 1
    assert predict_chunk(SimpleNamespace(config=fixed, uses_image=True)) == fixed.infer.batch_size > 1
    assert predict_chunk(SimpleNamespace(config=full, uses_image=False)) == full.infer.batch_size


def test_model_runs_on_each_study_while_the_next_ones_load(world, tmp_path, monkeypatch):  # noqa: F811
    """predict with workers and a full-resolution pipeline: the model runs on case k before case
    k + 1 is taken from the workers, and while it runs the workers hold the next cases (loading or
    loaded); before, a chunk of infer.batch_size cases was loaded before the model ran at all."""
    import dataclasses

    from mmai.inference.predictor import Predictor, predict_from_files

    events: list[tuple[str, int]] = []
    init, forward, load = Predictor.__init__, Predictor._forward, PrefetchLoader.load
    live: list[PrefetchLoader] = []

    def full_resolution(self, *a, **k):  # the world's run, seen as image.size: null (one shape per study)
        init(self, *a, **k)
        self.config = dataclasses.replace(self.config, image=dataclasses.replace(self.config.image, size=None))

    def record_forward(self, *a, **k):
        events.append(("model", len(live[0].futures) if live else -1))
        return forward(self, *a, **k)

    def record_load(self, *a, **k):
        live[:] = [self]
        events.append(("load", 0))
        return load(self, *a, **k)

    monkeypatch.setattr(Predictor, "__init__", full_resolution)
    monkeypatch.setattr(Predictor, "_forward", record_forward)
    monkeypatch.setattr(PrefetchLoader, "load", record_load)
    man = world.cohort / "manifest.csv"
    predict_from_files(world.run, tmp_path / "p.csv", manifest_path=man, workers=2, progress=False)
    kinds = [e for e, _ in events]
    assert kinds[:6] == ["load", "model"] * 3
    assert all(n > 0 for e, n in events[:6] if e == "model")  # the workers are ahead while the model runs
    assert len(pd.read_csv(tmp_path / "p.csv")) == len(pd.read_csv(man))


def test_the_focal_inventory_is_measured_in_the_workers_with_the_same_values(world, monkeypatch):  # noqa: F811
    """A run that takes the focal inventory has it measured by the preprocessing workers beside the
    volume: the main process measures nothing, and the values are those measured in place."""
    from mmai.data import focal
    from mmai.data.descriptors import is_focal
    from mmai.inference.pipelined import worker_measure
    from mmai.inference.predictor import Predictor
    from mmai.transforms.focal import FOCAL_NAMES

    pred = Predictor(world.run)
    pred.descriptors = FOCAL_NAMES  # the world's run, seen as one that takes the whole inventory
    assert is_focal(pred.descriptors) and worker_measure(pred) is not None
    cfg = pred.config.image
    m = pd.read_csv(world.cohort / "manifest.csv", dtype=str)[:3]
    df = m.assign(image=[str(world.cohort / p) for p in m["image"]])
    focal._MEMO.clear()
    ref = focal.attach_focal(cfg, df, pred.descriptors, loader=pred.loader)  # in place, in this process
    focal._MEMO.clear()
    pre = PrefetchLoader(pred.loader, list(df["image"]), workers=2, threads=None, measure=worker_measure(pred))
    try:  # the workers are forked: measuring in this process from now on fails the test
        monkeypatch.setattr(focal, "focal_descriptors", lambda *a: pytest.fail("measured in the main process"))
        got = focal.attach_focal(cfg, df, pred.descriptors, loader=pre)
        for p in df["image"]:  # the model then gets the volume the workers measured
            arr, _ = pre.load(p)
            assert (arr == pred.loader.load(p)[0]).all()
    finally:
        pre.close()
        focal._MEMO.clear()
    names = list(pred.descriptors)
    assert got[names].notna().all().all()
    pd.testing.assert_frame_equal(got[names], ref[names])


@pytest.mark.parametrize(("running", "threads_after"), [(1, 2), (5, 1)])
def test_the_last_studies_get_the_idle_workers_cores_on_a_quiet_machine(world, monkeypatch, running,  # noqa: F811
                                                                         threads_after):
    """Once every study is loaded the workers idle: the model gets its threads back when nothing
    else runs on the machine (only this process is running), and keeps one on a busy one."""
    from mmai.inference import pipelined
    from mmai.inference.predictor import Predictor

    pred = Predictor(world.run)
    m = pd.read_csv(world.cohort / "manifest.csv", dtype=str)
    paths = [str(world.cohort / p) for p in m["image"][:3]]
    monkeypatch.setattr(pipelined, "usable_cores", lambda: 2)
    monkeypatch.setattr(pipelined, "runnable_now", lambda: running)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pre = PrefetchLoader(pred.loader, paths, workers=2, ahead=1, threads=1)
        try:
            pre.load(paths[0])
            assert torch.get_num_threads() == 1  # studies still queued: the workers have work
            for p in paths[1:]:
                pre.load(p)
            assert torch.get_num_threads() == threads_after
        finally:
            pre.close()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
