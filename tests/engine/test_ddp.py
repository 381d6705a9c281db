"""``torchrun --nproc-per-node 2`` (gloo, CPU) trains every fusion with DDP; both ranks end with the
same weights and metrics; the world size is logged."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmai.config import FUSIONS
from tests.engine.conftest import ROOT, assert_same_last_checkpoint, assert_same_weights, log_rows, metrics

DRIVER = Path(__file__).with_name("ddp_driver.py")


def _torchrun(args: list[str], tmp: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp)
    assert r.returncode == 0 or not check, r.stderr[-4000:]
    return r


@pytest.mark.slow
def test_torchrun_trains_cross_attention_with_identical_ranks(cohort, tmp_path):
    _, pipe, manifest = cohort
    out = tmp_path / "run"
    _torchrun(["-m", "mmai", "train", "--config", str(pipe), "--manifest", str(manifest), "--out", str(out),
               "--epochs", "2", "--device", "cpu", "--threads", "1", "-q"], tmp_path)
    m = metrics(out)
    assert m["world_size"] == 2 and m["fusion"] == "cross_attention"
    assert len(m["rank_weight_digests"]) == 2 and len(set(m["rank_weight_digests"])) == 1
    assert len(set(m["rank_metrics_digests"])) == 1
    assert [r["world_size"] for r in log_rows(out)] == [2, 2]
    # validation and test are sharded + gathered: metrics cover every case, not one rank's half
    assert m["val"]["n"] == m["n_val"] and m["test"]["n"] == m["n_test"]


@pytest.mark.slow
def test_torchrun_trains_every_fusion_ranks_agree(cohort, tmp_path):
    """One torchrun job loops over the fusions (1 epoch each, gradient accumulation 2 so no_sync is
    used); each rank writes what it ended with; the files of the two ranks must be equal."""
    _, pipe, manifest = cohort
    _torchrun([str(DRIVER), str(pipe), str(manifest), str(tmp_path), ",".join(FUSIONS)], tmp_path)
    for fusion in FUSIONS:
        ranks = [json.loads((tmp_path / f"{fusion}.rank{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0] == ranks[1], fusion  # weights digest (computed by the driver) + full metrics
        assert ranks[0]["metrics"]["world_size"] == 2
        assert metrics(tmp_path / fusion)["model_id"].startswith(fusion)
        assert log_rows(tmp_path / fusion)[0]["world_size"] == 2


@pytest.mark.slow
def test_torchrun_killed_after_epoch_1_resumes_to_the_uninterrupted_run(cohort, tmp_path):
    """Rank 0 SIGKILLs itself right after committing epoch 1 of 3 (torchrun then stops rank 1);
    ``torchrun ... --resume`` restores both ranks' random states and ends where the
    uninterrupted 2-process run ends, tensor for tensor."""
    _, pipe, manifest = cohort
    args = ["train", "--config", str(pipe), "--manifest", str(manifest), "--fusion", "concat", "--epochs", "3",
            "--device", "cpu", "--threads", "1", "-q"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _torchrun(["-m", "mmai", *args, "--out", str(ref)], tmp_path)
    killed = _torchrun([str(Path(__file__).with_name("killer.py")), "1", *args, "--out", str(cut)], tmp_path,
                       check=False)
    assert killed.returncode != 0
    assert json.loads((cut / "ckpt" / "latest.json").read_text())["epoch"] == 1
    _torchrun(["-m", "mmai", *args, "--out", str(cut), "--resume"], tmp_path)
    assert_same_weights(ref / "model.safetensors", cut / "model.safetensors")
    assert_same_last_checkpoint(ref, cut)
    assert metrics(cut) == metrics(ref)
    assert [r["epoch"] for r in log_rows(cut)] == [1, 2, 3]
