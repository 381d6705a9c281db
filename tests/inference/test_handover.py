"""Volumes handed from predict's workers through memory files (mmai.inference.handover)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd
import pytest

from mmai.inference import handover
from mmai.inference.handover import Shipped, receive, set_keep, ship
from tests.inference.predict_world import world  # noqa: F401 - the shared fixture

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memfd and /proc: Linux only")


@pytest.fixture
def files():
    """Memory files kept by this process as if it were a worker; closed afterwards."""
    yield
    while handover._FILES:
        os.close(handover._FILES.popleft())
    set_keep(0)


def test_a_volume_comes_back_bit_for_bit_and_files_are_reused(files):
    set_keep(2)
    rng = np.random.default_rng(0)
    vols = [rng.standard_normal((2, 64, 64, 64)).astype(np.float32) for _ in range(3)]
    sent = [ship(v) for v in vols]
    assert all(isinstance(s, Shipped) for s in sent)
    assert sent[2].fd == sent[0].fd  # the oldest file reused for the third volume
    assert len(handover._FILES) == 2
    got = receive(sent[2])
    assert got is not None and got.dtype == np.float32 and got.shape == vols[2].shape
    assert np.array_equal(got, vols[2])
    assert np.array_equal(receive(sent[1]), vols[1])


def test_small_or_unkept_volumes_travel_as_they_are(files):
    small = np.ones((4, 4, 4), np.float32)
    set_keep(2)
    assert ship(small) is small and receive(small) is small
    set_keep(0)
    big = np.zeros((2, 256, 256, 8), np.float32)
    assert ship(big) is big


def test_a_file_that_is_gone_means_loading_in_place(files, caplog):
    set_keep(1)
    s = ship(np.zeros((2, 256, 256, 8), np.float32))
    os.close(handover._FILES.popleft())
    assert receive(s) is None
    assert "loading the case in place" in caplog.text
    s2 = ship(np.zeros((2, 256, 256, 4), np.float32))  # half the bytes the address promises
    assert receive(Shipped(s2.pid, s2.fd, s.shape, s.dtype, s.nbytes, s2.token)) is None


def test_a_result_whose_file_was_reused_is_never_taken_for_another_volume(files):
    """A case skipped, then the same path asked for later: its file may hold a newer study of the
    same size by then; the token says so and the case is loaded in place instead."""
    set_keep(1)
    first = ship(np.full((2, 256, 256, 8), 1.0, np.float32))
    second = ship(np.full((2, 256, 256, 8), 2.0, np.float32))  # same size, the same (only) file
    assert second.fd == first.fd and second.token != first.token
    assert receive(first) is None
    assert (receive(second) == 2.0).all()


@pytest.mark.slow
def test_workers_shipping_volumes_give_the_in_place_predictions(world, tmp_path, monkeypatch):  # noqa: F811
    from mmai.inference import pipelined

    monkeypatch.setattr(handover, "MIN_BYTES", 0)  # the world's small volumes go through files too
    shipped = []
    real = pipelined.receive
    monkeypatch.setattr(pipelined, "receive", lambda v: (shipped.append(isinstance(v, Shipped)), real(v))[1])
    man = world.broken_manifest(tmp_path, {1, 5}, raw=True)
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert world.predict(one, "--manifest", man, "--workers", "1") == 0
    assert world.predict(two, "--manifest", man, "--workers", "2") == 0
    assert shipped and all(shipped)
    assert two.read_bytes() == one.read_bytes()
    assert (tmp_path / "two.errors.csv").read_bytes() == (tmp_path / "one.errors.csv").read_bytes()
    assert len(pd.read_csv(two)) == 22


def test_after_one_unreadable_file_the_volumes_come_pickled(world, monkeypatch):  # noqa: F811
    """Where the model process cannot open a worker's memory file (a locked-down /proc), that case
    is loaded in place and the next volumes travel pickled: never every study in place."""
    from mmai.inference import pipelined
    from mmai.inference.predictor import Predictor

    monkeypatch.setattr(handover, "MIN_BYTES", 0)
    seen = []
    real = pipelined.receive

    def locked(v):  # the first shipped volume cannot be read
        seen.append(isinstance(v, Shipped))
        return None if len(seen) == 1 else real(v)

    monkeypatch.setattr(pipelined, "receive", locked)
    pred = Predictor(world.run)
    m = pd.read_csv(world.cohort / "manifest.csv", dtype=str)
    paths = [str(world.cohort / p) for p in m["image"][:8]]
    pre = pipelined.PrefetchLoader(pred.loader, paths, workers=2, ahead=2, threads=None)
    try:
        for p in paths:
            arr, _ = pre.load(p)
            assert np.array_equal(arr, pred.loader.load(p)[0])
    finally:
        pre.close()
    assert seen[0] and not pre._shipped
    assert not seen[-1]  # submitted after the failure: pickled
