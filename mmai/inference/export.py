"""``mmai export``: a trained run -> TorchScript or ONNX, inputs (image, image_present, clinical,
clinical_mask), output the predictions of predictions.csv (class probabilities, or the value /
log-risk). The preprocessing (image pipeline, clinical state.json) is not part of the export.
Both take any batch size: TorchScript traces one case and loops over the batch in a scripted
module; ONNX is exported through torch.export with a symbolic batch axis. Tests compare both
with the eager model on real-shaped inputs at batch sizes 1 and 3 (within 1e-4).
ONNX export needs the ``onnx`` package (``pip install mmai[onnx]``)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import torch

from mmai.errors import MmaiError
from mmai.models.heads import outputs_to_predictions
from mmai.transforms.pipelines import placeholder_shape
from mmai.utils import atomic_path

log = logging.getLogger(__name__)


class _Exported(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, kind: str) -> None:
        super().__init__()
        self.model = model
        self.kind = kind

    def forward(self, image: torch.Tensor, image_present: torch.Tensor, clinical: torch.Tensor,
                clinical_mask: torch.Tensor) -> torch.Tensor:
        return outputs_to_predictions(self.kind, self.model(image, image_present, clinical, clinical_mask))


class _PerCase(torch.nn.Module):
    """Runs a module traced for one case over each case of a batch (TorchScript-scripted loop).

    Tracing bakes the traced batch size into some shapes of the fusion models (in-place masked
    writes), so the exports trace one case and loop: any batch size, each case exactly as eager.
    """

    def __init__(self, one: torch.nn.Module) -> None:
        super().__init__()
        self.one = one

    def forward(self, image: torch.Tensor, image_present: torch.Tensor, clinical: torch.Tensor,
                clinical_mask: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        for i in range(image.shape[0]):
            outs.append(self.one(image[i : i + 1], image_present[i : i + 1], clinical[i : i + 1],
                                 clinical_mask[i : i + 1]))
        return torch.cat(outs, 0)


def example_inputs(predictor, batch: int = 2) -> tuple[torch.Tensor, ...]:  # noqa: ANN001 - a Predictor
    """Model-shaped random inputs: (image (B, C, D, H, W), image_present (B,), clinical (B, F),
    clinical_mask (B, F)); every other case without image, about 30% of clinical values missing."""
    cfg = predictor.config.image
    channels, *size = placeholder_shape(cfg) if cfg is not None else (1, 8, 8, 8)
    n_feat = predictor.pre.num_features if predictor.pre is not None else 0
    g = torch.Generator().manual_seed(0)
    present = (torch.arange(batch) % 2 == 0).float()
    mask = (torch.rand(batch, n_feat, generator=g) > 0.3).float()
    return (torch.rand(batch, channels, *size, generator=g), present, torch.randn(batch, n_feat, generator=g), mask)


def scripted_per_case(predictor) -> torch.jit.ScriptModule:  # noqa: ANN001 - a Predictor
    """The run's model + output transform, traced for one case and scripted over the batch (CPU)."""
    module = _Exported(predictor.model, predictor.encoding.kind).eval()
    one = tuple(t[:1] for t in example_inputs(predictor, batch=1))
    with torch.no_grad():
        traced = torch.jit.trace(module, one, check_trace=False)
    return torch.jit.script(_PerCase(traced))


INPUT_NAMES = ["image", "image_present", "clinical", "clinical_mask"]


def check_exportable(model: torch.nn.Module, run_dir: Path) -> None:
    """Refuse models whose outputs need more than the exported inputs: a sliding-window model
    (``model.windows``) places its tokens by the image affine, which the exported signature does
    not carry; exporting it would silently give other predictions than ``mmai predict``."""
    if getattr(model, "windows", None) is not None:
        raise MmaiError(f"{run_dir}: a model.windows model needs the image affine, which the exported "
                        "signature (image, image_present, clinical, clinical_mask) does not carry; export "
                        "is not supported for it (use mmai predict)")


def export_run(run_dir: Path, *, fmt: str, out: Path) -> Path:
    """Export ``run_dir``'s model to ``out`` (format ``torchscript`` or ``onnx``).

    Inputs: image (B, 1, D, H, W) preprocessed as in the run, image_present (B,), clinical and
    clinical_mask (B, F) from the run's clinical state; output (B, K) class probabilities or
    (B, 1) value / log-risk, as predictions.csv.
    """
    from mmai.engine.runspec import RunSpec
    from mmai.inference.predictor import Predictor

    if fmt not in ("torchscript", "onnx"):
        raise MmaiError(f"--format {fmt!r} is not allowed; choose torchscript or onnx")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as exc:
            raise MmaiError("ONNX export needs the onnx and onnxscript packages: pip install 'mmai[onnx]'") from exc
    out = Path(out)
    if out.is_dir():
        raise MmaiError(f"--out {out} is an existing folder; give a file path")
    predictor = Predictor(run_dir, device="cpu", ensemble=False)  # a K-fold run: its final model
    if RunSpec.load(run_dir).is_ensemble:
        log.warning("%s is a K-fold run: the export holds its final model (trained on all non-test rows), "
                    "while `mmai predict` on it averages the fold models", run_dir)
    check_exportable(predictor.model, run_dir)
    with atomic_path(out) as tmp:
        if fmt == "torchscript":
            scripted_per_case(predictor).save(str(tmp))
        else:
            _export_onnx(predictor, tmp)
    return out


def _export_onnx(predictor, path: Path) -> None:  # noqa: ANN001 - a Predictor
    """torch.export-based ONNX export with a symbolic batch axis (the TorchScript-based exporter
    bakes the traced batch size into the fusion models' masked writes)."""
    module = _Exported(predictor.model, predictor.encoding.kind).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    chatter = io.StringIO()  # the exporter prints its progress to stdout; keep it for --verbose
    try:
        with contextlib.redirect_stdout(chatter):
            torch.onnx.export(module, example_inputs(predictor), str(path), input_names=INPUT_NAMES,
                              output_names=["prediction"], dynamo=True, verbose=False, external_data=False,
                              dynamic_shapes=tuple({0: batch} for _ in INPUT_NAMES))
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; one line for the CLI
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MmaiError(f"ONNX export of {predictor.run_dir} failed: {first[:300]}") from exc
    finally:
        log.debug("torch.onnx: %s", chatter.getvalue().strip())
