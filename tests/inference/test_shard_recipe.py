"""The independent-jobs recipe of docs/scaling.md (SLURM array, Kubernetes indexed job): N predict
jobs with ``--shard I/N``, each its own ``--out``, then the documented concatenation step, give
the rows of one run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.inference.predict_world import world  # noqa: F401 - the shared fixture

DOC = Path(__file__).resolve().parents[2] / "docs" / "scaling.md"


def concat_command(parts: Path, out: Path) -> str:
    """The docs' concatenation one-liner, with the docs' folders replaced by ``parts`` / ``out``."""
    m = re.search(r'`python -c "(.+?)"`', DOC.read_text())
    assert m, "docs/scaling.md lost its concatenation command"
    return m.group(1).replace("/shared/preds/", f"{parts}/").replace("/shared/preds.csv", str(out))


@pytest.mark.slow
def test_two_shard_jobs_concatenated_equal_one_run(world, tmp_path):  # noqa: F811
    root = str(world.cohort / "images")
    one = tmp_path / "one.csv"
    assert world.predict(one, "--dicom-root", root) == 0
    parts = tmp_path / "preds"
    for i in range(2):  # the array tasks / pod indexes, one after the other
        assert world.predict(parts / f"part{i}.csv", "--dicom-root", root, "--shard", f"{i}/2") == 0
    shard_rows = [len(pd.read_csv(parts / f"part{i}.csv")) for i in range(2)]
    merged = tmp_path / "preds.csv"
    subprocess.run([sys.executable, "-c", concat_command(parts, merged)], check=True, cwd=tmp_path)
    ref = pd.read_csv(one).sort_values("case_id").reset_index(drop=True)
    got = pd.read_csv(merged).sort_values("case_id").reset_index(drop=True)
    assert min(shard_rows) > 0 and sum(shard_rows) == len(ref)  # disjoint shares, every case once
    pd.testing.assert_frame_equal(got, ref)


def test_concatenation_command_reads_only_the_parts(tmp_path):
    """The glob takes part<i>.csv, not the jobs' part<i>.errors.csv or a merged file beside them."""
    parts = tmp_path / "preds"
    parts.mkdir()
    pd.DataFrame({"case_id": ["a", "b"], "risk": [1.0, 2.0]}).to_csv(parts / "part0.csv", index=False)
    pd.DataFrame({"case_id": ["c"], "risk": [3.0]}).to_csv(parts / "part1.csv", index=False)
    pd.DataFrame({"case_id": ["x"], "stage": ["image"]}).to_csv(parts / "part1.errors.csv", index=False)
    merged = tmp_path / "preds.csv"
    subprocess.run([sys.executable, "-c", concat_command(parts, merged)], check=True, cwd=tmp_path)
    assert pd.read_csv(merged)["case_id"].tolist() == ["a", "b", "c"]
