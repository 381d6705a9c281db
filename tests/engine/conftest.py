"""A small synthetic cohort on a tiny grid, preprocessed once per session, and helpers that run
``python -m mmai train`` in a subprocess with one torch thread (bit-reproducible)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmai.cli import main

ROOT = Path(__file__).resolve().parents[2]


def write_pipeline(path: Path, **train) -> Path:
    """The demo pipeline at 24x24x16 with every source of training randomness switched on:
    translation + flip augmentation, dropout, image (modality) dropout, EMA."""
    cfg = yaml.safe_load((ROOT / "pipelines" / "demo.yaml").read_text())
    cfg["image"].update(spacing=[12.0, 12.0, 12.0], size=[24, 24, 16], fov={"mode": "crop"},  # cuts 7.5 % of z
                        augment={"translate": 1, "flip": True})
    cfg["model"].update(widths=[4, 8, 8, 16], dim=16, heads=2, dropout=0.1, image_dropout=0.2)
    cfg["train"].update({"epochs": 4, "batch_size": 8, "patience": 50, "ema": 0.9, **train})
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """(folder, pipeline yaml, preprocessed manifest) of 48 synthetic patients."""
    tmp = tmp_path_factory.mktemp("engine_cohort")
    pipe = write_pipeline(tmp / "tiny.yaml")
    assert main(["synth", "--out", str(tmp / "cohort"), "--n", "48", "--seed", "3", "-q"]) == 0
    assert main(["preprocess", "--config", str(pipe), "--input", str(tmp / "cohort" / "manifest.csv"),
                 "--out", str(tmp / "pre"), "-q"]) == 0
    return tmp, pipe, tmp / "pre" / "manifest.csv"


def run_cli(args: list[str], *, kill_after_epoch: int | None = None, check: bool = True
            ) -> subprocess.CompletedProcess:
    """``python -m mmai <args> --threads 1`` in a subprocess; with ``kill_after_epoch`` the process
    SIGKILLs itself as soon as that epoch's checkpoint commit is complete (tests/engine/killer.py)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if kill_after_epoch is None:
        cmd = [sys.executable, "-m", "mmai", *args, "--threads", "1"]
    else:
        cmd = [sys.executable, str(Path(__file__).with_name("killer.py")), str(kill_after_epoch), *args,
               "--threads", "1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} -> {r.returncode}\n{r.stderr[-3000:]}")
    return r


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}"


def assert_same_last_checkpoint(a: Path, b: Path) -> None:
    """The final epoch's commit (model, optimizer, EMA, random states) is the same tensor for tensor,
    and so are its counters: not only the kept best-epoch weights."""
    from mmai.engine.checkpoint import CheckpointStore

    (ta, sa), (tb, sb) = CheckpointStore(a / "ckpt").load(), CheckpointStore(b / "ckpt").load()
    assert sorted(ta) == sorted(tb)
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} of {len(ta)} checkpoint tensors differ, e.g. {differ[:3]}"
    for key in ("train", "optimizer", "scheduler", "rng"):
        if key == "train":  # wall-clock seconds, and so the byte length of log.jsonl, vary
            for row in (*sa[key]["history"], *sb[key]["history"]):
                row.pop("seconds", None)
            sa[key].pop("log_pos"), sb[key].pop("log_pos")
        assert sa[key] == sb[key], key


def log_rows(run: Path) -> list[dict]:
    """log.jsonl rows without their wall-clock ``seconds``."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds", None)
    return rows


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test (restored after): bit-reproducible and, on a shared
    machine, far faster for these tiny models than oversubscribed threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
