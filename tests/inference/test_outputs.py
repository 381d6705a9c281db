"""Outputs: an unwritable output is refused before any work in every verb (one line, exit 2);
one writer per output (a second run is refused naming the running process, a stale lock is taken
over, shards lock apart); a full disk mid-run is one line, exit 3, and a rerun resumes without
loss or duplicates. No traceback reaches the user."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import socket
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmai.errors import MmaiError
from mmai.inference import predictor as P
from mmai.outputs import OutputLock, guard
from tests.inference.predict_world import world  # noqa: F401 - the shared fixture
from tests.test_cli import run_cli


def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot write into: chmod 555, or (as root, whom modes do not stop) a
    kernel folder that refuses new entries."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for cand in (ro, Path("/sys/kernel"), Path("/proc/self")):
        try:
            (cand / ".probe").write_text("x")
            (cand / ".probe").unlink()
        except OSError:
            return cand
    pytest.skip("no unwritable folder on this machine")


VERBS = {
    "scan": lambda ro, t: ["scan", str(t / "root"), "--out", str(ro / "index.csv")],
    "convert": lambda ro, t: ["convert", str(t / "root"), "--out", str(ro / "conv")],
    "preprocess": lambda ro, t: ["preprocess", "--config", str(t / "p.yaml"), "--input", str(t / "m.csv"),
                                 "--out", str(ro / "pre")],
    "train": lambda ro, t: ["train", "--config", str(t / "p.yaml"), "--manifest", str(t / "m.csv"),
                            "--out", str(ro / "run")],
    "predict": lambda ro, t: ["predict", "--run", str(t / "run"), "--manifest", str(t / "m.csv"),
                              "--out", str(ro / "p.csv")],
    "predict --explain": lambda ro, t: ["predict", "--run", str(t / "run"), "--manifest", str(t / "m.csv"),
                                        "--out", str(t / "p.csv"), "--explain", str(ro / "explain")],
    "evaluate": lambda ro, t: ["evaluate", "--predictions", str(t / "p.csv"), "--manifest", str(t / "m.csv"),
                               "--out", str(ro / "report")],
    "clinical-schema": lambda ro, t: ["clinical-schema", str(t / "c.csv"), "--out", str(ro / "s.yaml")],
    "export": lambda ro, t: ["export", "--run", str(t / "run"), "--format", "torchscript", "--out", str(ro / "m.ts")],
    "synth": lambda ro, t: ["synth", "--out", str(ro / "synth"), "--n", "4"],
    "demo": lambda ro, t: ["demo", "--out", str(ro / "demo"), "--quick"],
}


@pytest.mark.parametrize("verb", list(VERBS))
def test_unwritable_output_is_one_line_exit_2_before_any_work(verb, tmp_path, capsys):
    ro = _unwritable(tmp_path)
    capsys.readouterr()
    # the inputs do not exist: a verb that did any work first would fail on them instead
    assert run_cli(VERBS[verb](ro, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be written" in err[0], err
    assert "Traceback" not in err[0]
    assert not (tmp_path / "p.csv").exists()


def _holder() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _write_lock(path: Path, pid: int, verb: str = "predict") -> None:
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "verb": verb, "started": "now"}))


def test_second_predict_on_one_output_is_refused_then_a_stale_lock_is_taken_over(world, tmp_path,  # noqa: F811
                                                                                  capsys):
    out = tmp_path / "p.csv"
    lock = tmp_path / "p.csv.lock"
    other = _holder()  # a live process holding the output
    try:
        _write_lock(lock, other.pid)
        capsys.readouterr()
        assert world.predict(out, "--manifest", str(world.pre / "manifest.csv")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {other.pid}" in err[0] and "being written by mmai predict" in err[0], err
        assert not out.exists()  # refused before any row
    finally:
        other.kill()
        other.wait()
    # the holder is gone (a killed run): its lock is stale and taken over
    assert world.predict(out, "--manifest", str(world.pre / "manifest.csv")) == 0
    df = pd.read_csv(out)
    assert len(df) == 24 and df["case_id"].is_unique
    assert not lock.exists()  # released at the end


def test_train_and_preprocess_lock_their_folder_and_shards_lock_apart(tmp_path):
    other = _holder()
    try:
        for verb, name in (("train", ".mmai-train.lock"), ("preprocess", ".mmai-preprocess.lock")):
            (tmp_path / verb).mkdir()
            _write_lock(tmp_path / verb / name, other.pid, verb)
            with pytest.raises(MmaiError, match=f"being written by mmai {verb} \\(pid {other.pid}"), \
                    guard(verb, Namespace(out=tmp_path / verb, shard=None)):
                pass
        # preprocess shards write into one folder in parallel: each locks its own name
        _write_lock(tmp_path / "preprocess" / ".mmai-preprocess.shard0of2.lock", other.pid, "preprocess")
        with guard("preprocess", Namespace(out=tmp_path / "preprocess", shard=(1, 2))):
            assert (tmp_path / "preprocess" / ".mmai-preprocess.shard1of2.lock").exists()
        assert not (tmp_path / "preprocess" / ".mmai-preprocess.shard1of2.lock").exists()
    finally:
        other.kill()
        other.wait()


def test_lock_of_a_live_process_on_another_host_is_not_taken_over(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "verb": "predict", "started": "now"}))
    with pytest.raises(MmaiError, match="on elsewhere"):
        OutputLock(lock, "predict", tmp_path / "x").acquire()


def test_full_disk_mid_predict_is_one_line_and_a_rerun_resumes_without_loss_or_duplicates(
        world, tmp_path, monkeypatch, capsys):  # noqa: F811
    out = tmp_path / "p.csv"
    real = P.append_rows
    calls = {"n": 0}

    def disk_full_on_second_batch(fh, writer, rows):
        calls["n"] += 1
        if calls["n"] < 2:
            return real(fh, writer, rows)
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=writer.fieldnames, lineterminator="\n").writerows(rows)
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half a batch reached the disk: a torn row
        fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))

    monkeypatch.setattr(P, "append_rows", disk_full_on_second_batch)  # 24 cases: batches of 16 and 8
    capsys.readouterr()
    assert world.predict(out, "--manifest", str(world.pre / "manifest.csv")) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on device" in err[0] and "Traceback" not in err[0], err
    assert calls["n"] == 2
    assert not out.read_bytes().endswith(b"\n")  # the torn row is there
    assert not (tmp_path / "p.csv.lock").exists()  # the lock is released on the way out
    monkeypatch.setattr(P, "append_rows", real)
    assert world.predict(out, "--manifest", str(world.pre / "manifest.csv")) == 0
    df = pd.read_csv(out).set_index("case_id").sort_index()
    assert len(df) == 24 and df.index.is_unique
    ref = world.reference()
    np.testing.assert_allclose(df["prob_1"], ref["prob_1"], atol=1e-6)


def test_an_internal_error_is_one_line_exit_3_and_the_traceback_only_with_verbose(monkeypatch, tmp_path, capsys):
    import mmai.cli as cli

    def boom(a):
        raise RuntimeError("something\nunexpected")

    for verbose in ([], ["-v"]):
        parser = cli.build_parser()
        monkeypatch.setattr(cli, "build_parser", lambda parser=parser: parser)
        parser._subparsers._group_actions[0].choices["synth"].set_defaults(func=boom)
        capsys.readouterr()
        assert run_cli(["synth", "--out", str(tmp_path / "s"), *verbose]) == 3
        err = capsys.readouterr().err
        line = [x for x in err.splitlines() if x.startswith("mmai synth: error:")]
        assert len(line) == 1 and "internal error: RuntimeError: something | unexpected" in line[0]
        assert ("Traceback" in err) == bool(verbose)


def test_full_disk_mid_preprocess_stops_in_one_line_and_the_rerun_completes(tmp_path, monkeypatch, capsys):
    """A full disk is not the case's fault: preprocess stops (exit 3) instead of listing every
    remaining case as failed, and the rerun makes the missing volumes only."""
    import mmai.preprocess as PP
    from tests.inference.test_raw_input_predict import N, _cohort, _pipeline

    manifest = _cohort(tmp_path, "CT")
    pipe = _pipeline(tmp_path, "ct_head")
    real = PP._process_one
    calls = {"n": 0}

    def full_on_fourth(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), a[2])
        return real(*a, **k)

    monkeypatch.setattr(PP, "_process_one", full_on_fourth)
    argv = ["preprocess", "--config", str(pipe), "--input", str(manifest), "--out", str(tmp_path / "pre"), "-q"]
    capsys.readouterr()
    assert run_cli(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on device" in err[0], err
    assert len(list((tmp_path / "pre" / "images").glob("*.nii.gz"))) == 3
    monkeypatch.setattr(PP, "_process_one", real)
    from mmai.preprocess import run_preprocess

    summary = run_preprocess(config_path=pipe, input_path=manifest, out_dir=tmp_path / "pre", progress=False)
    assert summary.n_skipped == 3 and summary.n_done == N - 3 and summary.n_failed == 0
    man = pd.read_csv(tmp_path / "pre" / "manifest.csv")
    assert len(man) == N and man["case_id"].is_unique


def test_two_predicts_started_together_on_one_output_leave_one_row_per_case(world, tmp_path):  # noqa: F811
    """The double click of the issue: two `mmai predict` processes on the same --out. One writes,
    the other is refused in one line naming it; the file holds each case once."""
    m = pd.read_csv(world.pre / "manifest.csv", dtype=str)
    m["image"] = [str(world.pre / p) for p in m["image"]]
    big = pd.concat([m.assign(case_id=m["case_id"] + f"-{k}") for k in range(8)], ignore_index=True)  # 192 cases
    big.to_csv(tmp_path / "m.csv", index=False)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mmai", "predict", "--run", str(world.run), "--manifest", str(tmp_path / "m.csv"),
           "--out", str(tmp_path / "p.csv"), "--device", "cpu", "-q"]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    df = pd.read_csv(tmp_path / "p.csv")
    assert len(df) == len(big) and df["case_id"].is_unique
    if codes == [0, 2]:  # they overlapped: the second was refused
        err = next(e for rc, e in results if rc == 2).strip().splitlines()
        assert len(err) == 1 and "is being written by mmai predict (pid" in err[0], err
    else:  # one finished before the other started: the second found every case done
        assert codes == [0, 0]


def test_full_disk_mid_training_is_one_line_and_resume_finishes(tmp_path, monkeypatch, capsys):
    from mmai.engine.checkpoint import CheckpointStore
    from tests.inference.test_raw_input_predict import _cohort, _pipeline

    manifest = _cohort(tmp_path, "CT")
    pipe = _pipeline(tmp_path, "ct_head")
    real = CheckpointStore.commit

    def full_after_first_epoch(self, epoch, *a, **k):
        if epoch >= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.folder))
        return real(self, epoch, *a, **k)

    monkeypatch.setattr(CheckpointStore, "commit", full_after_first_epoch)
    argv = ["train", "--config", str(pipe), "--manifest", str(manifest), "--out", str(tmp_path / "run"),
            "--epochs", "3", "--device", "cpu", "-q"]
    capsys.readouterr()
    assert run_cli(argv) == 3
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("WARNING ")]  # logged warnings (e.g. autoconfig's) are not the error
    assert len(err) == 1 and "no space left on device" in err[0] and "--resume" in err[0], err
    assert not (tmp_path / "run" / "DONE").exists() and not (tmp_path / "run" / ".mmai-train.lock").exists()
    monkeypatch.setattr(CheckpointStore, "commit", real)
    assert run_cli([*argv, "--resume"]) == 0
    assert (tmp_path / "run" / "DONE").exists()
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 3  # epochs 1 (kept), 2, 3
