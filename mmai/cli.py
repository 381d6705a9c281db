"""`mmai ...`: the command line. Thin: parse arguments, configure logging, call the library.

Exit status: 0 success; 1 a batch where every case failed (`predict`); 2 bad input, with one line
`mmai VERB: error: <reason>` (argument errors, any MmaiError, an output that cannot be written or
that another run is writing); 3 a failure while running (a full disk, an I/O error, an internal
error), one line too (``-v`` logs the traceback); 130 interrupted. Options shared
by several verbs (`--out`, `--device`, `--workers`, `--shard`, `--salt-file`) come from one
helper each. The handlers live in mmai/commands.py and import what they need inside, so
`mmai --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

from mmai import commands
from mmai.errors import MmaiError

log = logging.getLogger("mmai")

from mmai.models.fusion_names import FUSIONS  # noqa: E402  (the one list; torch-free)
from mmai.pacs.options import int_at_least  # noqa: E402  (argparse only)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``mmai VERB: error: <reason> (see mmai VERB --help)``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


_workers = int_at_least(1)  # --workers, --threads: whole numbers >= 1


def _out_file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing folder; give a file path")
    return path


def _out_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing file; give a folder")
    return path


# --------------------------------------------------------------------------- shared options


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    p.add_argument("-q", "--quiet", action="store_true", help="only log warnings and errors; no progress bars")


def _add_out(p: argparse.ArgumentParser, kind: str, help: str, required: bool = True) -> None:
    """``--out``: a file (``kind="file"``; an existing folder is an error) or a folder (``"dir"``)."""
    p.add_argument("--out", required=required, type=_out_file if kind == "file" else _out_dir, help=help)


def _add_device(p: argparse.ArgumentParser, default: str | None = None) -> None:
    auto = "cuda if available" if default is None else default
    p.add_argument("--device", default=default, help=f"cpu, cuda or cuda:N (default: {auto})")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_workers, default=None, help="torch CPU threads, >= 1 (default: torch's choice)")


def _add_workers(p: argparse.ArgumentParser, what: str = "parallel workers", default: int | None = 1,
                 default_text: str = "1") -> None:
    p.add_argument("--workers", type=_workers, default=default, help=f"{what} (>= 1, default {default_text})")


def _add_shard(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="handle only shard I of N (cases I, I+N, I+2N, ...; 0-based)")


def _add_salt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--salt-file", default=None, metavar="FILE",
                   help="file holding the secret key of the patient pseudonyms (default: $MMAI_PSEUDONYM_KEY, "
                   "else a public salt, with a warning; docs/cli.md)")


def _add_pacs(p: argparse.ArgumentParser, results: bool) -> None:
    from mmai.pacs.options import add_pacs_options  # argparse only

    add_pacs_options(p, results=results)


# --------------------------------------------------------------------------- parser


def _parser_scan(sub: Any) -> None:
    s = sub.add_parser("scan", help="index a DICOM tree: one row per series (header-only reads)",
                       description="Walk DICOM_ROOT, read headers only, and write one row per series "
                       "(stack) with its problems. Non-DICOM files are skipped and listed.")
    s.add_argument("dicom_root", help="folder to walk (recursively)")
    _add_out(s, "file", "index CSV to write")
    s.add_argument("--config", help="pipeline YAML whose image.dicom tolerances judge the stacks (the "
                   "loader's; default: the built-in ones)")
    _add_workers(s, "parallel header readers")
    s.add_argument("--include-phi", action="store_true",
                   help="write the real PatientID (default: a pseudonym p-<hash>; see docs/dicom_scan.md)")
    _add_salt(s)
    _add_common(s)
    s.set_defaults(func=commands.scan)


def _parser_convert(sub: Any) -> None:
    s = sub.add_parser("convert", help="DICOM series -> NIfTI + JSON sidecar (like dcm2niix)",
                       description="Convert every image series (localizers excluded) under DICOM_ROOT "
                       "to NIfTI with a JSON sidecar; failures go to OUT/errors.csv with the reason.")
    s.add_argument("dicom_root", help="folder to walk (recursively)")
    _add_out(s, "dir", "output folder")
    s.add_argument("--config", help="pipeline YAML whose image.select rule narrows the series")
    _add_workers(s)
    s.add_argument("--split-phases", action="store_true",
                   help="write one file per phase/echo instead of one 4D file")
    s.add_argument("--uneven", choices=("resample", "error", "keep"), default=None,
                   help="series not uniformly spaced (missing slice, gaps, jitter): resample onto a uniform "
                   "grid (default), error, or keep the raw slices (sidecar: geometry irregular + positions); "
                   "overrides the --config's image.dicom.uneven")
    _add_salt(s)
    _add_common(s)
    s.set_defaults(func=commands.convert)


def _parser_preprocess(sub: Any) -> None:
    s = sub.add_parser("preprocess", help="DICOM root or manifest -> preprocessed volumes + manifest",
                       description="Load each case's image, run the pipeline's MONAI transforms, and "
                       "write OUT/images/<case_id>.nii.gz, OUT/manifest.csv and OUT/errors.csv. "
                       "Finished cases are skipped on re-run; one bad case never stops the others.")
    s.add_argument("--config", required=True, help="pipeline YAML")
    s.add_argument("--input", help="a DICOM root folder or a manifest CSV/Parquet/JSON (or --dicomweb / --dimse)")
    _add_out(s, "dir", "output folder")
    _add_device(s, "cpu")
    _add_workers(s, "parallel case workers")
    _add_shard(s)
    _add_salt(s)
    _add_pacs(s, results=False)
    _add_common(s)
    s.set_defaults(func=commands.preprocess)


def _parser_train(sub: Any) -> None:
    s = sub.add_parser("train", help="train a fusion model (or a baseline) on a manifest",
                       description="Train on the manifest's training rows and write RUN_DIR with "
                       "config.yaml, model.safetensors, state.json, metrics.json, log.jsonl, plots/.")
    s.add_argument("--config", required=True, help="pipeline YAML")
    s.add_argument("--manifest", required=True, help="manifest CSV (e.g. preprocess's OUT/manifest.csv)")
    _add_out(s, "dir", "run folder to write")
    s.add_argument("--fusion", choices=FUSIONS, default=None,
                   help="fusion strategy (default: the YAML's model.fusion)")
    s.add_argument("--folds", type=int, default=None, help="K-fold cross-validation (default: YAML)")
    s.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    _add_device(s)
    s.add_argument("--resume", action="store_true", help="continue exactly from RUN_DIR's last checkpoint "
                   "(same config and flags; finished folds are skipped)")
    s.add_argument("--amp", choices=("bf16", "fp16", "off"), default=None,
                   help="mixed precision (default: the YAML's train.amp, off); fp16 uses a GradScaler, CUDA only")
    _add_threads(s)
    _add_common(s)
    s.set_defaults(func=commands.train)


def _parser_pretrain(sub: Any) -> None:
    s = sub.add_parser("pretrain", help="self-supervised pretraining of the image encoder on unlabelled images",
                       description="Masked-volume inpainting (+ optional contrastive views) on the manifest's images (no "
                       "labels needed); writes DIR/encoder.safetensors + DIR/pretrain.json for model.pretrained: DIR.")
    s.add_argument("--config", required=True, help="pipeline YAML (image, model.encoder/widths, pretrain: section)")
    s.add_argument("--manifest", required=True, help="manifest CSV of the unlabelled cases (case_id, image)")
    _add_out(s, "dir", "pretraining folder to write")
    s.add_argument("--epochs", type=int, default=None, help="override pretrain.epochs")
    _add_device(s)
    s.add_argument("--resume", action="store_true", help="continue exactly from DIR's last checkpoint")
    _add_threads(s)
    _add_common(s)
    s.set_defaults(func=commands.pretrain)


def _parser_predict(sub: Any) -> None:
    s = sub.add_parser("predict", help="batch inference with a trained run",
                       description="Predict every case of a manifest (or a DICOM root plus a clinical "
                       "table). Resumable; failures go to <out>.errors.csv.")
    s.add_argument("--run", required=True, help="run folder written by mmai train")
    s.add_argument("--manifest", help="manifest of cases to predict")
    s.add_argument("--dicom-root", help="DICOM root (series picked by the run's selection rule)")
    s.add_argument("--clinical", help="clinical table for --dicom-root, joined by case_id or patient_id "
                   "(see docs/cli.md); without it every case is predicted with clinical values missing")
    _add_out(s, "file", "predictions CSV")
    s.add_argument("--explain", help="folder for explanations (3D saliency NIfTI, clinical attributions, an "
                   "offline 3D viewer page per case)")
    s.add_argument("--no-ensemble", action="store_true", help="a K-fold run (train --folds K): predict with its "
                   "final model instead of averaging its K fold models (the default)")
    _add_device(s)
    _add_workers(s, "processes that read and preprocess the next studies while the model runs, and DICOM "
                 "header readers for --dicom-root; 1: in place", default=None,
                 default_text="the usable cores, at most 8")
    _add_shard(s)
    _add_salt(s)
    _add_pacs(s, results=True)
    _add_common(s)
    s.set_defaults(func=commands.predict)


def _parser_evaluate(sub: Any) -> None:
    s = sub.add_parser("evaluate", help="metrics with bootstrap CIs, calibration and plots",
                       description="Join predictions to the manifest's targets by case_id and report "
                       "metrics with 95% bootstrap confidence intervals.")
    s.add_argument("--predictions", required=True, help="predictions CSV from mmai predict")
    s.add_argument("--manifest", required=True, help="manifest with the true targets")
    _add_out(s, "dir", "report folder (report.json, report.html, plots)", required=False)
    s.add_argument("--split", default=None, choices=["train", "val", "test", "all"],
                   help="manifest rows to score: train, val, test or all (default: test when the manifest has "
                   "a split column, else all)")
    s.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    s.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    s.add_argument("--target", default="label", help="manifest column with the true label/value (default label)")
    s.add_argument("--time", default="time", help="survival: follow-up time column (default time)")
    s.add_argument("--event", default="event", help="survival: event column, 1 = event (default event)")
    s.add_argument("--time-unit", default=None, help="survival: unit of the time column for the Kaplan-Meier "
                   "axis, e.g. days or months (default: the axis says Time)")
    s.add_argument("--explain", metavar="DIR", help="folder written by mmai predict --explain: report.html gains "
                   "a 3D viewer (scan + saliency, three planes) of a few explained cases (needs --out)")
    s.add_argument("--viewer-cases", type=int_at_least(1), default=4, metavar="N",
                   help="cases in the 3D viewer, >= 1 (default 4: half most right, half most wrong)")
    _add_common(s)
    s.set_defaults(func=commands.evaluate)


def _parser_clinical_schema(sub: Any) -> None:
    s = sub.add_parser("clinical-schema", help="propose the typed clinical: section from a table",
                       description="Read a clinical CSV and propose the clinical: section of a "
                       "pipeline YAML (types, ranges, vocabularies) for you to edit.")
    s.add_argument("table", help="clinical CSV")
    _add_out(s, "file", "YAML file to write (default: stdout)", required=False)
    s.add_argument("--exclude", nargs="*", default=None,
                   help="columns to leave out (default: case_id, patient_id, label, time, event, split, fold, image)")
    _add_common(s)
    s.set_defaults(func=commands.clinical_schema)


def _parser_export(sub: Any) -> None:
    s = sub.add_parser("export", help="export a trained run to TorchScript or ONNX")
    s.add_argument("--run", required=True, help="run folder")
    s.add_argument("--format", choices=["torchscript", "onnx"], required=True, help="export format")
    _add_out(s, "file", "file to write")
    _add_common(s)
    s.set_defaults(func=commands.export)


def _parser_synth(sub: Any) -> None:
    s = sub.add_parser("synth", help="write a synthetic cohort with known ground truth",
                       description="Write DIR/manifest.csv, clinical.csv, images/, truth.csv and truth.json "
                       "(the Bayes-optimal AUROC or C-index).")
    _add_out(s, "dir", "output folder")
    s.add_argument("--n", type=int, default=200, help="number of patients (default 200)")
    s.add_argument("--task", choices=["binary", "survival"], default="binary", help="outcome kind")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--format", choices=["dicom", "nifti"], default="dicom", help="image format")
    _add_workers(s, "processes writing images (same cohort for any value)")
    s.add_argument("--kind", choices=["demo", "nodule", "semireal"], default="demo",
                   help="demo: the demo's 4x4x5 mm chest cohort; nodule: 2 mm chests with a lesion mask whose "
                        "deciding feature is seen only at full resolution (needs --format nifti); semireal: the "
                        "GBSG2 table (686 patients, survival) with tumour size and node count drawn into breast "
                        "CTs (NIfTI) and removed from the table (--n, --task, --format do not apply)")
    s.add_argument("--mask", action="store_true", help="semireal: also write the tumour mask (lesion_mask)")
    s.add_argument("--variant", default=None, metavar="NAME",
                   help="semireal: how the scans look (default: the documented cohort; e.g. low_contrast, "
                        "thick_slices, small_nodes, hard; the list: mmai.synth_semireal.VARIANTS)")
    s.add_argument("--split-seed", type=int, default=None, metavar="K",
                   help="semireal: draw the 467/219 train/test split with seed K (default: the fixed split)")
    _add_common(s)
    s.set_defaults(func=commands.synth)


def _parser_demo(sub: Any) -> None:
    s = sub.add_parser("demo", help="synth -> preprocess -> train 3 models -> predict -> evaluate",
                       description="Run the whole pipeline on a synthetic cohort and print a table "
                       "comparing cross-attention fusion with image-only and clinical-only models.")
    s.add_argument("--out", default="mmai_demo", type=_out_dir, help="output folder (default ./mmai_demo)")
    s.add_argument("--quick", action="store_true", help="smaller cohort and fewer epochs (smoke test)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _add_common(s)
    s.set_defaults(func=commands.demo)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mmai",
        description="Multimodal medical AI: DICOM/NIfTI studies + a clinical table -> 3D fusion models.",
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    _parser_scan(sub)
    _parser_convert(sub)
    _parser_preprocess(sub)
    _parser_train(sub)
    _parser_pretrain(sub)
    _parser_predict(sub)
    _parser_evaluate(sub)
    _parser_clinical_schema(sub)
    _parser_export(sub)
    _parser_synth(sub)
    _parser_demo(sub)
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


def _one_line(exc: BaseException) -> str:
    """An error message on one line (multi-line reasons, e.g. lists of cases, joined with ' | ')."""
    return " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m mmai -- predict --run ...` (torchrun would take --run itself)
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "verbose", False), getattr(args, "quiet", False))
    salted = bool(getattr(args, "salt_file", None))
    try:
        if salted:
            from mmai.io.deid import read_salt_file, set_pseudonym_key

            set_pseudonym_key(read_salt_file(args.salt_file))
        from mmai.outputs import guard

        with guard(args.verb, args):  # outputs writable, one writer per output
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
    except OSError as exc:  # a full disk, a folder made read-only mid-run, an I/O error
        from mmai.outputs import disk_error_message

        log.debug("traceback", exc_info=True)
        sys.stderr.write(f"mmai {args.verb}: error: {disk_error_message(exc, args.verb)}\n")
        return 3
    except Exception as exc:  # noqa: BLE001 - no traceback reaches a user; -v logs it
        log.debug("traceback", exc_info=True)
        sys.stderr.write(f"mmai {args.verb}: error: internal error: {type(exc).__name__}: {_one_line(exc)} "
                         "(rerun with -v for the traceback and report it)\n")
        return 3
    finally:
        if salted:
            from mmai.io.deid import set_pseudonym_key

            set_pseudonym_key(None)


if __name__ == "__main__":
    raise SystemExit(main())
