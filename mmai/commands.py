"""What each `mmai` verb does once its arguments are parsed (mmai/cli.py builds the parser).

Each handler takes the parsed ``argparse.Namespace`` and returns the exit status; errors propagate to
``mmai.cli.main``, which turns them into one line and an exit code. Heavy imports happen inside the
handlers so `mmai --help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from mmai.errors import MmaiError

log = logging.getLogger("mmai")


def scan(a: argparse.Namespace) -> int:
    from mmai.io.convert import read_pipeline_image
    from mmai.io.deid import DEFAULT_SALT
    from mmai.io.dicom_scan import scan_tree

    salt = DEFAULT_SALT if a.include_phi else _salt()  # --include-phi makes no pseudonyms
    _, policy = read_pipeline_image(Path(a.config) if a.config else None)  # image.dicom tolerances
    df = scan_tree(Path(a.dicom_root), workers=a.workers, progress=not a.quiet, include_phi=a.include_phi,
                   salt=salt, policy=policy)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    n_bad = int((df["problems"].fillna("") != "").sum()) if "problems" in df else 0
    log.info("wrote %s: %d series (%d with problems)", out, len(df), n_bad)
    return 0


def _salt() -> str:
    """The pseudonym key in force (set from --salt-file by main, else $MMAI_PSEUDONYM_KEY, else the default)."""
    from mmai.io.deid import pseudonym_key

    return pseudonym_key()


def convert(a: argparse.Namespace) -> int:
    from mmai.io.convert import convert_tree

    report = convert_tree(
        Path(a.dicom_root), Path(a.out), config_path=Path(a.config) if a.config else None,
        workers=a.workers, split_phases=a.split_phases, progress=not a.quiet, uneven=a.uneven,
        salt=_salt(),
    )
    return _finish("convert", report, some_failed=bool(report.errors))


def preprocess(a: argparse.Namespace) -> int:
    from mmai.pacs.options import uses_pacs
    from mmai.preprocess import run_preprocess

    if uses_pacs(a):  # --dicomweb / --dimse (docs/pacs.md)
        from mmai.pacs.options import preprocess as pacs_preprocess

        pacs_summary = pacs_preprocess(a)
        return _finish("preprocess", pacs_summary, some_failed=pacs_summary.n_failed > 0)
    if not a.input:
        raise MmaiError("preprocess needs --input (a DICOM root or a manifest), --dicomweb URL or --dimse AET@HOST:PORT")
    summary = run_preprocess(
        config_path=Path(a.config), input_path=Path(a.input), out_dir=Path(a.out),
        device=a.device, workers=a.workers, shard=a.shard, progress=not a.quiet,
    )
    return _finish("preprocess", summary, some_failed=summary.n_failed > 0)


def train(a: argparse.Namespace) -> int:
    from mmai.engine.trainer import train_from_files

    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)
    result = train_from_files(
        config_path=Path(a.config), manifest_path=Path(a.manifest), out_dir=Path(a.out),
        fusion=a.fusion, folds=a.folds, epochs=a.epochs, device=a.device, resume=a.resume,
        progress=not a.quiet, amp=a.amp,
    )
    log.info("%s", result)
    return 0


def pretrain(a: argparse.Namespace) -> int:
    from mmai.pretrain.run import pretrain_from_files

    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)
    result = pretrain_from_files(Path(a.config), Path(a.manifest), Path(a.out), epochs=a.epochs, device=a.device,
                                 resume=a.resume, progress=not a.quiet)
    log.info("%s", result)
    return 0


def predict(a: argparse.Namespace) -> int:
    from mmai.inference.startup import prefer_small_pages, quiet_imports

    prefer_small_pages()  # before numpy's import (mmai.inference.startup)
    with quiet_imports():  # torch, MONAI, mmai: no garbage collection while importing
        from mmai.inference.predictor import predict_from_files
        from mmai.pacs.options import uses_pacs

    if uses_pacs(a):  # --dicomweb / --dimse (docs/pacs.md)
        from mmai.pacs.options import predict as pacs_predict

        pacs_summary = pacs_predict(a)
        return _finish("predict", pacs_summary, some_failed=pacs_summary.n_failed > 0)
    if bool(a.manifest) == bool(a.dicom_root):
        raise MmaiError("predict needs exactly one of --manifest or --dicom-root")
    summary = predict_from_files(
        run_dir=Path(a.run), out_csv=Path(a.out),
        manifest_path=Path(a.manifest) if a.manifest else None,
        dicom_root=Path(a.dicom_root) if a.dicom_root else None,
        clinical_path=Path(a.clinical) if a.clinical else None,
        explain_dir=Path(a.explain) if a.explain else None,
        device=a.device, shard=a.shard, progress=not a.quiet, workers=a.workers, ensemble=not a.no_ensemble,
    )
    return _finish("predict", summary, some_failed=summary.n_failed > 0)


def _finish(verb: str, summary: Any, *, some_failed: bool) -> int:
    """The closing line of a batch verb; exit status 1 when every case failed (``summary.all_failed``)."""
    if summary.all_failed:
        sys.stderr.write(f"mmai {verb}: error: every case failed: {summary}\n")
        return 1
    log.log(logging.WARNING if some_failed else logging.INFO, "%s", summary)
    return 0


def evaluate(a: argparse.Namespace) -> int:
    from mmai.evaluate import evaluate_files

    report = evaluate_files(
        predictions_path=Path(a.predictions), manifest_path=Path(a.manifest),
        out_dir=Path(a.out) if a.out else None, n_boot=a.n_boot, seed=a.seed,
        target=a.target, time=a.time, event=a.event, split=a.split, time_unit=a.time_unit,
        explain_dir=Path(a.explain) if a.explain else None, viewer_cases=a.viewer_cases,
    )
    from mmai.evaluate import format_report

    sys.stdout.write(format_report(report) + "\n")
    return 0


def clinical_schema(a: argparse.Namespace) -> int:
    import yaml

    from mmai.clinical.propose import propose_schema_from_file

    proposal = propose_schema_from_file(Path(a.table), exclude=a.exclude)
    text = yaml.safe_dump({"clinical": proposal}, sort_keys=False)
    if a.out:
        Path(a.out).write_text(text)
        log.info("wrote %s: edit it, then paste it into your pipeline YAML", a.out)
    else:
        sys.stdout.write(text)
    return 0


def export(a: argparse.Namespace) -> int:
    from mmai.inference.export import export_run

    export_run(Path(a.run), fmt=a.format, out=Path(a.out))
    log.info("wrote %s", a.out)
    return 0


def synth(a: argparse.Namespace) -> int:
    from mmai.errors import ConfigError
    from mmai.synth import SynthSpec, write_cohort

    if a.kind != "semireal" and (a.variant is not None or a.split_seed is not None):
        raise ConfigError("synth --variant / --split-seed apply to --kind semireal only")
    if a.kind == "nodule":
        from mmai.synth_nodule import write_nodule_cohort

        if a.task != "binary" or a.format != "nifti":
            raise ConfigError("synth --kind nodule writes a binary task as NIfTI only; use --task binary --format nifti")
        info = write_nodule_cohort(Path(a.out), n=a.n, seed=a.seed, progress=not a.quiet, workers=a.workers)
        log.info("wrote a %d-case nodule cohort to %s (Bayes-optimal auroc = %.3f)", a.n, a.out, info["bayes"])
        return 0
    if a.kind == "semireal":
        from mmai.synth_semireal import DEFAULT_VARIANT, variant, write_semireal_cohort

        info = write_semireal_cohort(Path(a.out), seed=a.seed, mask=a.mask, progress=not a.quiet, workers=a.workers,
                                     var=variant(a.variant) if a.variant else DEFAULT_VARIANT,
                                     split_seed=a.split_seed)
        log.info("wrote the %d-patient semi-real GBSG2 cohort (%s) to %s (tsize and pnodes in the images only)",
                 info["n"], a.variant or "default", a.out)
        return 0
    spec = SynthSpec(n=a.n, task=a.task, seed=a.seed, fmt=a.format)
    info = write_cohort(Path(a.out), spec, progress=not a.quiet, workers=a.workers)
    log.info("wrote a %d-case %s cohort to %s (Bayes-optimal %s = %.3f)",
             spec.n, spec.task, a.out, info["metric"], info["bayes"])
    return 0


def demo(a: argparse.Namespace) -> int:
    from mmai.demo import run_demo

    summary = run_demo(Path(a.out), quick=a.quick, progress=not a.quiet, seed=a.seed)
    from mmai.demo import format_summary

    sys.stdout.write(format_summary(summary) + "\n")
    return 0
