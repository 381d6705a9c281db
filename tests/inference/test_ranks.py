"""``torchrun --nproc-per-node 2 -m mmai -- predict|preprocess``: the cases are split by rank and ONE
merged, resumable output is written, equal to a one-process run (before issue 18 both ranks
predicted every case into the same file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mmai.errors import MmaiError
from mmai.inference.ranks import _interleave, _merge_predictions, rank_job
from tests.inference.predict_world import world  # noqa: F401 - the shared fixture

ROOT = Path(__file__).resolve().parents[2]


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mmai", "--", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.mark.slow
def test_torchrun_predict_two_ranks_equals_one_process_and_resumes(world, tmp_path):  # noqa: F811
    man = world.broken_manifest(tmp_path, {3, 10})
    one = tmp_path / "one.csv"
    assert world.predict(one, "--manifest", man) == 0
    two = tmp_path / "two.csv"
    r = torchrun(["predict", "--run", str(world.run), "--manifest", man, "--out", str(two), "-q"], tmp_path)
    assert two.read_bytes() == one.read_bytes()  # 22 rows, the manifest's order, no duplicates
    assert len(pd.read_csv(two)) == 22
    assert (tmp_path / "two.errors.csv").read_bytes() == (tmp_path / "one.errors.csv").read_bytes()
    assert sorted(p.name for p in tmp_path.glob("two*")) == ["two.csv", "two.errors.csv"]  # parts merged away
    assert "22 predicted, 2 failed, 0 skipped" in r.stderr + r.stdout
    r = torchrun(["predict", "--run", str(world.run), "--manifest", man, "--out", str(two), "-q"], tmp_path)
    assert two.read_bytes() == one.read_bytes()  # resumed: nothing twice
    assert "0 predicted, 2 failed, 22 skipped" in r.stderr + r.stdout


@pytest.mark.slow
def test_torchrun_predict_dicom_root_two_ranks_equals_one_process(world, tmp_path):  # noqa: F811
    root = world.cohort / "images"
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert world.predict(one, "--dicom-root", str(root)) == 0
    torchrun(["predict", "--run", str(world.run), "--dicom-root", str(root), "--out", str(two), "-q"], tmp_path)
    assert two.read_bytes() == one.read_bytes()
    assert (tmp_path / "two.join.json").read_text() == (tmp_path / "one.join.json").read_text()


@pytest.mark.slow
def test_torchrun_preprocess_two_ranks_equals_one_process(world, tmp_path):  # noqa: F811
    from mmai.cli import main

    man = str(world.cohort / "manifest.csv")
    assert main(["preprocess", "--config", str(world.pipe), "--input", man, "--out", str(tmp_path / "one"), "-q"]) == 0
    torchrun(["preprocess", "--config", str(world.pipe), "--input", man, "--out", str(tmp_path / "two")], tmp_path)
    for name in ("manifest.csv", "errors.csv"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert not list((tmp_path / "two").glob("*.shard*"))
    ones = sorted(p.name for p in (tmp_path / "one" / "images").iterdir())
    assert ones == sorted(p.name for p in (tmp_path / "two" / "images").iterdir())


def test_shard_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(MmaiError, match=r"--shard 0/4 under torchrun \(2 processes\)"):
        rank_job((0, 4))
    assert rank_job(None).shard == (1, 2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert rank_job(None) is None


def test_merge_restores_the_case_order_and_keeps_earlier_rows(tmp_path):
    out = tmp_path / "p.csv"
    out.write_text("case_id,prob\nold,0.5\n")
    parts = [tmp_path / "p.rank0of2.csv", tmp_path / "p.rank1of2.csv"]
    parts[0].write_text("case_id,prob\nold,0.5\na,0.1\nc,0.3\n")
    parts[1].write_text("case_id,prob\nb,0.2\nd,0.4\ne,0.")  # a torn last row (killed mid-write) is dropped
    (tmp_path / "p.rank1of2.errors.csv").write_text("case_id,stage,series,error\nz,select,,no CT\n")
    _merge_predictions(out, parts, parts, [["a", "c", "e"], ["b", "d"]])
    assert out.read_text() == "case_id,prob\nold,0.5\na,0.1\nb,0.2\nc,0.3\nd,0.4\n"
    assert (tmp_path / "p.errors.csv").read_text() == "case_id,stage,series,error\nz,select,,no CT\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.errors.csv"]
    assert _interleave([[0, 2, 4], [1, 3]]) == [0, 1, 2, 3, 4]


def test_double_dash_before_the_verb_is_accepted(capsys):
    """`torchrun ... -m mmai -- predict --run ...`: torchrun passes the `--` on to mmai."""
    from mmai.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--", "predict", "--help"])
    assert exc.value.code == 0
    assert "--run" in capsys.readouterr().out
