"""Robustness: pydicom's bundled test files plus seeded truncated and bit-flipped copies.

The scan must return (never raise, never hang), account for every file (in a stack, skipped as
non-DICOM/DICOMDIR, ignored as a duplicate SOPInstanceUID, or unreadable), and name every
truncated copy in a problems entry or the unreadable list. convert_tree over the same tree
must give every stack a status: written, skipped (with the reason) or an errors.csv row.
Bounded by design: header reads stop before the pixel data and only move forward.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_files

from mmai.io.convert import convert_tree
from mmai.io.dicom_scan import scan

SEED = 20240601
N_CORRUPT = 40  # source files for corrupted copies (each gives 2 truncated + 1 bit-flipped copy)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path] | Path]:
    root = tmp_path_factory.mktemp("robust")
    files = sorted(Path(f) for f in get_testdata_files() if os.path.isfile(f))
    assert len(files) > 100
    base = Path(os.path.commonpath([str(f) for f in files]))
    for f in files:
        dst = root / "orig" / f.relative_to(base)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
    rng = np.random.default_rng(SEED)
    dicom_like = [f for f in files if f.suffix in (".dcm", "") and f.stat().st_size > 400]
    picks = [dicom_like[i] for i in rng.choice(len(dicom_like), size=N_CORRUPT, replace=False)]
    truncated, flipped = [], []
    for n, f in enumerate(picks):
        data = f.read_bytes()
        for frac in (float(rng.uniform(0.05, 0.5)), float(rng.uniform(0.5, 0.98))):
            cut = max(140, int(len(data) * frac))
            dst = root / "bad" / f"{n:03d}_{f.name}.trunc{int(frac * 100)}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data[:cut])
            truncated.append(dst)
        arr = bytearray(data)
        head = min(len(arr), 4096)  # flip bits where the parser looks: the header
        for pos in rng.integers(132, head, size=24):
            arr[int(pos)] ^= 1 << int(rng.integers(0, 8))
        dst = root / "bad" / f"{n:03d}_{f.name}.flip"
        dst.write_bytes(bytes(arr))
        flipped.append(dst)
    return {"root": root, "truncated": truncated, "flipped": flipped}


def test_scan_accounts_for_every_file(tree: dict) -> None:
    root: Path = tree["root"]
    res = scan(root)
    in_stacks = {p for s in res.stacks for p in s.files}
    accounted = in_stacks | set(res.non_dicom) | set(res.dicomdirs) | set(res.duplicates) | {
        p for p, _ in res.unreadable}
    everything = {p for p in root.rglob("*") if p.is_file()}
    assert everything == accounted, sorted(str(p) for p in everything - accounted)[:5]
    problems = ";".join(s.row["problems"] for s in res.stacks)
    silent = [p for p in tree["truncated"]
              if p.name not in problems and p not in {u for u, _ in res.unreadable}
              and p not in res.non_dicom and p not in res.dicomdirs]
    # A copy cut exactly between two elements of a non-image object (SR, RTPLAN, ...) is a valid,
    # shorter dataset: nothing in its header can tell. Everything else must be named.
    for p in silent:
        stack = next(s for s in res.stacks if p in s.files or p.name in s.row["problems"])
        assert stack.row["kind"] == "non-image", (p.name, stack.row)
    assert len(silent) <= len(tree["truncated"]) // 4
    for _p, reason in res.unreadable:
        assert reason and "\n" not in reason


def test_workers_two_same_result(tree: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import mmai.io.dicom_scan_read as reader

    monkeypatch.setattr(reader, "MIN_POOL_FILES", 8)
    a = scan(tree["root"] / "bad")
    b = scan(tree["root"] / "bad", workers=2)
    assert [s.row for s in a.stacks] == [s.row for s in b.stacks]


def test_convert_gives_every_stack_a_status(tree: dict, tmp_path: Path) -> None:
    rep = convert_tree(tree["root"], tmp_path / "out")
    res = scan(tree["root"])
    ids = {s.row["stack_id"] for s in res.stacks}
    assert set(rep.stack_status) == ids
    with open(tmp_path / "out" / "errors.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    errored = {sid for sid, st in rep.stack_status.items() if st == "error"}
    assert errored == {r["stack_id"] for r in rows}
    assert all(r["error"] and r["stage"] in ("scan", "load", "header", "write") for r in rows)
    assert len(rep.written) > 5
    leftovers = [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]
    assert not leftovers
