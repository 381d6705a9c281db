"""A tiny trained run over a synthetic DICOM cohort, shared by the predict tests (module-scoped
fixture ``world``): 24 patients, one CT study each, a cross-attention model trained 2 epochs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from mmai.cli import main
from tests.test_end_to_end import tiny_world


@dataclass
class World:
    tmp: Path
    pipe: Path
    cohort: Path
    pre: Path
    run: Path

    def predict(self, out: Path, *args: str) -> int:
        return main(["predict", "--run", str(self.run), "--out", str(out), "-q", *args])

    def broken_manifest(self, tmp_path: Path, rows, *, raw: bool = False) -> str:
        """A manifest of the cohort whose ``rows`` point at an unreadable image: the preprocessed
        volumes, or with ``raw`` the raw DICOM folders (each case then runs the whole chain)."""
        folder = self.cohort if raw else self.pre
        m = pd.read_csv(folder / "manifest.csv", dtype=str)
        (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
        m["image"] = [str(tmp_path / "broken.nii.gz") if i in rows else str(folder / p)
                      for i, p in enumerate(m["image"])]
        path = tmp_path / "m.csv"
        m.to_csv(path, index=False)
        return str(path)

    def reference(self) -> pd.DataFrame:
        """Predictions from the cohort manifest (raw DICOM folders + clinical columns), by case_id."""
        out = self.tmp / "reference.csv"
        if not out.exists():
            assert self.predict(out, "--manifest", str(self.cohort / "manifest.csv")) == 0
        return pd.read_csv(out).set_index("case_id").sort_index()


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("predict_world")
    pipe = tiny_world(tmp)
    return World(tmp=tmp, pipe=pipe, cohort=tmp / "cohort", pre=tmp / "pre", run=tmp / "run")
