"""`mmai ...`: the command line. Thin: parse arguments, configure logging, call the library.

Every verb exits 0 on success and 2 with a one-line reason on bad input (any MmaiError).
Heavy imports happen inside the handlers so `mmai --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mmai.errors import MmaiError

log = logging.getLogger("mmai")

from mmai.models.fusion_names import FUSIONS  # noqa: E402  (the one list; torch-free)


def _shard(text: str) -> tuple[int, int]:
    """Parse `I/N` (0-based shard I of N)."""
    try:
        i_s, n_s = text.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from exc
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need N >= 1 and 0 <= I < N")
    return i, n


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    p.add_argument("-q", "--quiet", action="store_true", help="only log warnings and errors; no progress bars")


# --------------------------------------------------------------------------- handlers


def _cmd_scan(a: argparse.Namespace) -> int:
    from mmai.io.dicom_scan import scan_tree

    df = scan_tree(Path(a.dicom_root), workers=a.workers, progress=not a.quiet, include_phi=a.include_phi)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    n_bad = int((df["problems"].fillna("") != "").sum()) if "problems" in df else 0
    log.info("wrote %s: %d series (%d with problems)", out, len(df), n_bad)
    return 0


def _cmd_convert(a: argparse.Namespace) -> int:
    from mmai.io.convert import convert_tree

    report = convert_tree(
        Path(a.dicom_root), Path(a.out), config_path=Path(a.config) if a.config else None,
        workers=a.workers, split_phases=a.split_phases, progress=not a.quiet,
    )
    log.info("%s", report)
    return 0


def _cmd_preprocess(a: argparse.Namespace) -> int:
    from mmai.preprocess import run_preprocess

    summary = run_preprocess(
        config_path=Path(a.config), input_path=Path(a.input), out_dir=Path(a.out),
        device=a.device, workers=a.workers, shard=a.shard, progress=not a.quiet,
    )
    log.info("%s", summary)
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from mmai.engine.trainer import train_from_files

    result = train_from_files(
        config_path=Path(a.config), manifest_path=Path(a.manifest), out_dir=Path(a.out),
        fusion=a.fusion, folds=a.folds, epochs=a.epochs, device=a.device, resume=a.resume,
        progress=not a.quiet,
    )
    log.info("%s", result)
    return 0


def _cmd_predict(a: argparse.Namespace) -> int:
    from mmai.inference.predictor import predict_from_files

    if bool(a.manifest) == bool(a.dicom_root):
        raise MmaiError("predict needs exactly one of --manifest or --dicom-root")
    summary = predict_from_files(
        run_dir=Path(a.run), out_csv=Path(a.out),
        manifest_path=Path(a.manifest) if a.manifest else None,
        dicom_root=Path(a.dicom_root) if a.dicom_root else None,
        clinical_path=Path(a.clinical) if a.clinical else None,
        explain_dir=Path(a.explain) if a.explain else None,
        device=a.device, shard=a.shard, progress=not a.quiet,
    )
    log.info("%s", summary)
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from mmai.evaluate import evaluate_files

    report = evaluate_files(
        predictions_path=Path(a.predictions), manifest_path=Path(a.manifest),
        out_dir=Path(a.out) if a.out else None, n_boot=a.n_boot, seed=a.seed,
        target=a.target, time=a.time, event=a.event,
    )
    from mmai.evaluate import format_report

    sys.stdout.write(format_report(report) + "\n")
    return 0


def _cmd_clinical_schema(a: argparse.Namespace) -> int:
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


def _cmd_export(a: argparse.Namespace) -> int:
    from mmai.inference.export import export_run

    export_run(Path(a.run), fmt=a.format, out=Path(a.out))
    log.info("wrote %s", a.out)
    return 0


def _cmd_synth(a: argparse.Namespace) -> int:
    from mmai.synth import SynthSpec, write_cohort

    spec = SynthSpec(n=a.n, task=a.task, seed=a.seed, fmt=a.format)
    info = write_cohort(Path(a.out), spec, progress=not a.quiet, workers=a.workers)
    log.info("wrote a %d-case %s cohort to %s (Bayes-optimal %s = %.3f)",
             spec.n, spec.task, a.out, info["metric"], info["bayes"])
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from mmai.demo import run_demo

    summary = run_demo(Path(a.out), quick=a.quick, progress=not a.quiet, seed=a.seed)
    from mmai.demo import format_summary

    sys.stdout.write(format_summary(summary) + "\n")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmai",
        description="Multimodal medical AI: DICOM/NIfTI studies + a clinical table -> 3D fusion models.",
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser("scan", help="index a DICOM tree: one row per series (header-only reads)",
                       description="Walk DICOM_ROOT, read headers only, and write one row per series "
                       "(stack) with its problems. Non-DICOM files are skipped and listed.")
    s.add_argument("dicom_root", help="folder to walk (recursively)")
    s.add_argument("--out", required=True, help="index CSV to write")
    s.add_argument("--workers", type=int, default=1, help="parallel header readers (default 1)")
    s.add_argument("--include-phi", action="store_true",
                   help="write the real PatientID (default: a pseudonym p-<hash>; see docs/dicom_scan.md)")
    _add_common(s)
    s.set_defaults(func=_cmd_scan)

    s = sub.add_parser("convert", help="DICOM series -> NIfTI + JSON sidecar (like dcm2niix)",
                       description="Convert every image series (localizers excluded) under DICOM_ROOT "
                       "to NIfTI with a JSON sidecar; failures go to OUT/errors.csv with the reason.")
    s.add_argument("dicom_root", help="folder to walk (recursively)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--config", help="pipeline YAML whose image.select rule narrows the series")
    s.add_argument("--workers", type=int, default=1, help="parallel workers (default 1)")
    s.add_argument("--split-phases", action="store_true",
                   help="write one file per phase/echo instead of one 4D file")
    _add_common(s)
    s.set_defaults(func=_cmd_convert)

    s = sub.add_parser("preprocess", help="DICOM root or manifest -> preprocessed volumes + manifest",
                       description="Load each case's image, run the pipeline's MONAI transforms, and "
                       "write OUT/images/<case_id>.nii.gz, OUT/manifest.csv and OUT/errors.csv. "
                       "Finished cases are skipped on re-run; one bad case never stops the others.")
    s.add_argument("--config", required=True, help="pipeline YAML")
    s.add_argument("--input", required=True, help="a DICOM root folder or a manifest CSV/Parquet/JSON")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the transforms (default cpu)")
    s.add_argument("--workers", type=int, default=1, help="parallel case workers (default 1)")
    s.add_argument("--shard", type=_shard, default=None, metavar="I/N", help="process only shard I of N")
    _add_common(s)
    s.set_defaults(func=_cmd_preprocess)

    s = sub.add_parser("train", help="train a fusion model (or a baseline) on a manifest",
                       description="Train on the manifest's training rows and write RUN_DIR with "
                       "config.yaml, model.safetensors, state.json, metrics.json, log.jsonl, plots/.")
    s.add_argument("--config", required=True, help="pipeline YAML")
    s.add_argument("--manifest", required=True, help="manifest CSV (e.g. preprocess's OUT/manifest.csv)")
    s.add_argument("--out", required=True, help="run folder to write")
    s.add_argument("--fusion", choices=FUSIONS, default=None,
                   help="fusion strategy (default: the YAML's model.fusion)")
    s.add_argument("--folds", type=int, default=None, help="K-fold cross-validation (default: YAML)")
    s.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    s.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    s.add_argument("--resume", action="store_true", help="continue from RUN_DIR's last checkpoint")
    _add_common(s)
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("predict", help="batch inference with a trained run",
                       description="Predict every case of a manifest (or a DICOM root plus a clinical "
                       "table). Resumable; failures go to <out>.errors.csv.")
    s.add_argument("--run", required=True, help="run folder written by mmai train")
    s.add_argument("--manifest", help="manifest of cases to predict")
    s.add_argument("--dicom-root", help="DICOM root (series picked by the run's selection rule)")
    s.add_argument("--clinical", help="clinical table for --dicom-root (case_id or patient_id column)")
    s.add_argument("--out", required=True, help="predictions CSV")
    s.add_argument("--explain", help="folder for explanations (3D saliency NIfTI, clinical attributions)")
    s.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    s.add_argument("--shard", type=_shard, default=None, metavar="I/N", help="predict only shard I of N")
    _add_common(s)
    s.set_defaults(func=_cmd_predict)

    s = sub.add_parser("evaluate", help="metrics with bootstrap CIs, calibration and plots",
                       description="Join predictions to the manifest's targets by case_id and report "
                       "metrics with 95% bootstrap confidence intervals.")
    s.add_argument("--predictions", required=True, help="predictions CSV from mmai predict")
    s.add_argument("--manifest", required=True, help="manifest with the true targets")
    s.add_argument("--out", help="report folder (report.json + plots)")
    s.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    s.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    s.add_argument("--target", default="label", help="manifest column with the true label/value (default label)")
    s.add_argument("--time", default="time", help="survival: follow-up time column (default time)")
    s.add_argument("--event", default="event", help="survival: event column, 1 = event (default event)")
    _add_common(s)
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("clinical-schema", help="propose the typed clinical: section from a table",
                       description="Read a clinical CSV and propose the clinical: section of a "
                       "pipeline YAML (types, ranges, vocabularies) for you to edit.")
    s.add_argument("table", help="clinical CSV")
    s.add_argument("--out", help="YAML file to write (default: stdout)")
    s.add_argument("--exclude", nargs="*", default=None,
                   help="columns to leave out (default: case_id, patient_id, label, time, event, split, fold, image)")
    _add_common(s)
    s.set_defaults(func=_cmd_clinical_schema)

    s = sub.add_parser("export", help="export a trained run to TorchScript or ONNX")
    s.add_argument("--run", required=True, help="run folder")
    s.add_argument("--format", choices=["torchscript", "onnx"], required=True, help="export format")
    s.add_argument("--out", required=True, help="file to write")
    _add_common(s)
    s.set_defaults(func=_cmd_export)

    s = sub.add_parser("synth", help="write a synthetic cohort with known ground truth",
                       description="Write DIR/manifest.csv, clinical.csv, images/, truth.csv and truth.json "
                       "(the Bayes-optimal AUROC or C-index).")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n", type=int, default=200, help="number of patients (default 200)")
    s.add_argument("--task", choices=["binary", "survival"], default="binary", help="outcome kind")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--format", choices=["dicom", "nifti"], default="dicom", help="image format")
    s.add_argument("--workers", type=int, default=1, help="processes writing images (default 1; same cohort)")
    _add_common(s)
    s.set_defaults(func=_cmd_synth)

    s = sub.add_parser("demo", help="synth -> preprocess -> train 3 models -> predict -> evaluate",
                       description="Run the whole pipeline on a synthetic cohort and print a table "
                       "comparing cross-attention fusion with image-only and clinical-only models.")
    s.add_argument("--out", default="mmai_demo", help="output folder (default ./mmai_demo)")
    s.add_argument("--quick", action="store_true", help="smaller cohort and fewer epochs (smoke test)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _add_common(s)
    s.set_defaults(func=_cmd_demo)
    return p


def _version() -> str:
    from mmai import __version__

    return f"mmai {__version__}"


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("mmai").setLevel(level)
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)  # optional GPU codec


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "verbose", False), getattr(args, "quiet", False))
    try:
        return int(args.func(args))
    except MmaiError as exc:
        sys.stderr.write(f"mmai {args.verb}: error: {exc}\n")
        return 2
    except FileNotFoundError as exc:
        sys.stderr.write(f"mmai {args.verb}: error: file not found: {exc.filename or exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"mmai {args.verb}: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
