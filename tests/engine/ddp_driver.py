"""Run under torchrun: ``ddp_driver.py PIPELINE MANIFEST OUT FUSION[,FUSION...]``.

Trains each fusion for one epoch (gradient accumulation 2) with DDP and writes, per rank,
OUT/<fusion>.rank<R>.json: the digest of the weights this rank kept (computed here, on each
rank) and the metrics the rank returned."""

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    from mmai.config import load_config
    from mmai.engine import run
    from mmai.io.manifest import load_manifest

    torch.set_num_threads(1)
    pipe, manifest, out, fusions = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4].split(",")
    rank = int(os.environ["RANK"])
    kept: dict[str, str] = {}
    real_check = run._check_ranks_agree

    def record(metrics, model, info):
        digest = hashlib.sha1()
        for k, v in sorted(model.state_dict().items()):
            digest.update(k.encode())
            digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        kept["weights"] = digest.hexdigest()
        return real_check(metrics, model, info)

    run._check_ranks_agree = record
    # one process group for all runs (mmai's session joins it and leaves it to its owner: the
    # group is created and destroyed once, as a program calling train() repeatedly should do)
    torch.distributed.init_process_group("gloo")
    for fusion in fusions:
        cfg = run.apply_overrides(load_config(pipe), fusion=fusion, epochs=1)
        cfg = cfg.replace(train=dataclasses.replace(cfg.train, accumulate=2))
        df = load_manifest(manifest, cfg)
        metrics = run.train(cfg, df, out / fusion, device="cpu", progress=False)
        doc = {"weights": kept["weights"], "metrics": metrics}
        (out / f"{fusion}.rank{rank}.json").write_text(json.dumps(doc, sort_keys=True, default=str))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
