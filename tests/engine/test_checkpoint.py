"""Exact resume: a run killed at any point and resumed is the run it would have been."""

import json
import signal

import pandas as pd
import pytest
import torch

from mmai.engine import checkpoint
from mmai.engine.checkpoint import CheckpointStore
from mmai.engine.trainer import train_from_files
from mmai.errors import CheckpointError
from tests.engine.conftest import assert_same_last_checkpoint, assert_same_weights, log_rows, metrics, run_cli


def _train_args(pipe, manifest, out, *extra):
    return ["train", "--config", str(pipe), "--manifest", str(manifest), "--out", str(out), "--device", "cpu",
            "-q", *extra]


@pytest.mark.slow
def test_sigkill_after_epoch_2_of_4_then_resume_is_bit_identical(cohort, tmp_path):
    _, pipe, manifest = cohort
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_cli(_train_args(pipe, manifest, ref))
    killed = run_cli(_train_args(pipe, manifest, cut), kill_after_epoch=2, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((cut / "ckpt" / "latest.json").read_text())["epoch"] == 2
    assert not (cut / "model.safetensors").exists() and len(log_rows(cut)) == 2
    run_cli(_train_args(pipe, manifest, cut, "--resume"))
    assert_same_weights(ref / "model.safetensors", cut / "model.safetensors")
    assert_same_last_checkpoint(ref, cut)
    assert metrics(cut) == metrics(ref)  # same model_id (weights digest), val/test metrics, best epoch
    assert log_rows(cut) == log_rows(ref) and [r["epoch"] for r in log_rows(cut)] == [1, 2, 3, 4]
    # only the last commit is kept
    assert sorted(p.suffix for p in (cut / "ckpt").iterdir()) == [".json", ".json", ".safetensors"]


class _Crash(RuntimeError):
    pass


def _inject(monkeypatch, *, fail_at: int):
    """Make the ``fail_at``-th checkpoint file write (0-based, counted over the whole run; a commit
    is 3 writes) or, for ``fail_at = 3 * commit + 3``, the cleanup after a commit, raise."""
    calls = {"n": 0}
    real_write, real_clean = checkpoint._write_file, CheckpointStore.clean

    def write(path, fn):
        if calls["n"] == fail_at:
            raise _Crash(f"injected before write {fail_at} ({path.name})")
        calls["n"] += 1
        real_write(path, fn)

    def clean(self):
        if calls["n"] == fail_at and fail_at % 3 == 0 and fail_at > 0:
            raise _Crash("injected after the pointer moved, before cleanup")
        real_clean(self)

    monkeypatch.setattr(checkpoint, "_write_file", write)
    monkeypatch.setattr(CheckpointStore, "clean", clean)


@pytest.mark.slow
def test_kill_between_any_two_checkpoint_writes_resumes_to_a_state_of_the_run(cohort, tmp_path, monkeypatch,
                                                                             one_thread):
    _, pipe, manifest = cohort
    kw = {"fusion": "concat", "epochs": 3, "device": "cpu", "progress": False}
    ref = tmp_path / "ref"
    train_from_files(pipe, manifest, ref, **kw)
    # epoch 2's commit is writes 3, 4, 5 (tensors, state, pointer); 6 = after its pointer moved
    for fail_at, resumed_epoch in ((3, 1), (4, 1), (5, 1), (6, 2)):
        out = tmp_path / f"cut{fail_at}"
        with monkeypatch.context() as m:
            _inject(m, fail_at=fail_at)
            with pytest.raises(_Crash):
                train_from_files(pipe, manifest, out, **kw)
        assert json.loads((out / "ckpt" / "latest.json").read_text())["epoch"] == resumed_epoch
        train_from_files(pipe, manifest, out, resume=True, **kw)
        assert_same_weights(ref / "model.safetensors", out / "model.safetensors")
        assert_same_last_checkpoint(ref, out)
        assert [r["epoch"] for r in log_rows(out)] == [1, 2, 3], fail_at  # no epoch logged twice
        assert log_rows(out) == log_rows(ref)
        leftovers = sorted(p.name for p in (out / "ckpt").iterdir())
        assert len(leftovers) == 3, leftovers


@pytest.mark.slow
def test_kfold_resume_skips_finished_folds_and_continues_the_interrupted_one(cohort, tmp_path, monkeypatch,
                                                                              one_thread):
    from mmai.engine import run

    _, pipe, manifest = cohort
    kw = {"fusion": "clinical_only", "epochs": 2, "folds": 2, "device": "cpu", "progress": False}
    ref, out = tmp_path / "ref", tmp_path / "cut"
    train_from_files(pipe, manifest, ref, **kw)
    real_commit = CheckpointStore.commit

    def commit(self, epoch, tensors, state):
        real_commit(self, epoch, tensors, state)
        if self.folder.parent.name == "fold1" and epoch == 1:
            raise _Crash("killed in fold1 after epoch 1")

    with monkeypatch.context() as m:
        m.setattr(CheckpointStore, "commit", commit)
        with pytest.raises(_Crash):
            train_from_files(pipe, manifest, out, **kw)
    assert (out / "folds" / "fold0" / "DONE").exists() and not (out / "folds" / "fold1" / "DONE").exists()
    calls = []
    real_split = run.train_split

    def spy(config, df, split, out_dir, **k):
        calls.append((split.name, k["resume"]))
        return real_split(config, df, split, out_dir, **k)

    monkeypatch.setattr(run, "train_split", spy)
    train_from_files(pipe, manifest, out, resume=True, **kw)
    assert calls == [("fold1", True), ("main", False)]  # fold0 skipped, fold1 continued, final model fresh
    for sub in ("folds/fold0", "folds/fold1", "."):
        assert_same_weights(ref / sub / "model.safetensors", out / sub / "model.safetensors")
        assert_same_last_checkpoint(ref / sub, out / sub)
    assert metrics(out)["cv"] == metrics(ref)["cv"]
    oof, oof_ref = pd.read_csv(out / "oof_predictions.csv"), pd.read_csv(ref / "oof_predictions.csv")
    pd.testing.assert_frame_equal(oof, oof_ref)
    cases = pd.read_csv(manifest)
    assert set(oof["fold"]) == {"fold0", "fold1"} and oof["case_id"].is_unique
    assert len(oof) == (cases["split"] != "test").sum()  # every non-test case predicted once, out of fold
    assert {"prob_0", "prob_1", "label", "patient_id"} <= set(oof.columns)


def test_resume_refuses_other_settings_and_missing_checkpoints(cohort, tmp_path, one_thread, monkeypatch):
    _, pipe, manifest = cohort
    kw = {"fusion": "clinical_only", "device": "cpu", "progress": False}
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train_from_files(pipe, manifest, tmp_path / "none", resume=True, epochs=1, **kw)
    train_from_files(pipe, manifest, tmp_path / "run", epochs=1, **kw)
    with pytest.raises(CheckpointError, match="train.epochs"):
        train_from_files(pipe, manifest, tmp_path / "run", resume=True, epochs=2, **kw)
    # a fresh run in the same folder forgets the old checkpoint at once: killed before its own first
    # commit, it leaves nothing to resume (not the older run's state under the same settings)
    def die(path, fn):
        raise _Crash("killed before the first commit")

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_write_file", die)
        with pytest.raises(_Crash):
            train_from_files(pipe, manifest, tmp_path / "run", epochs=1, **kw)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train_from_files(pipe, manifest, tmp_path / "run", resume=True, epochs=1, **kw)


def test_commit_keeps_the_previous_checkpoint_until_the_pointer_moves(tmp_path):
    store = CheckpointStore(tmp_path)
    store.commit(1, {"w": torch.ones(2)}, {"epoch": 1})
    (tmp_path / ".ckpt-e0002-dead.x1.tmp.safetensors").write_bytes(b"half")  # a killed writer's temp file
    (tmp_path / "ckpt-e0002-dead.safetensors").write_bytes(b"orphan")  # an interrupted commit
    tensors, state = store.load()
    assert state == {"epoch": 1} and torch.equal(tensors["w"], torch.ones(2))
    store.commit(2, {"w": torch.full((2,), 2.0)}, {"epoch": 2})
    tensors, state = store.load()
    assert state == {"epoch": 2} and torch.equal(tensors["w"], torch.full((2,), 2.0))
    assert len(list(tmp_path.iterdir())) == 3  # pointer + the two files it names; the rest cleaned
