"""``mmai export``: a trained run -> TorchScript or ONNX, inputs (image, image_present, clinical,
clinical_mask), output the predictions of predictions.csv (class probabilities, or the value /
log-risk). The preprocessing (image pipeline, clinical state.json) is not part of the export.
TorchScript is traced with one case: call it once per case (batch size 1); the ONNX graph has a
dynamic batch axis."""

from __future__ import annotations

from pathlib import Path

import torch

from mmai.errors import MmaiError
from mmai.models.heads import outputs_to_predictions
from mmai.utils import atomic_path


class _Exported(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, kind: str) -> None:
        super().__init__()
        self.model = model
        self.kind = kind

    def forward(self, image: torch.Tensor, image_present: torch.Tensor, clinical: torch.Tensor,
                clinical_mask: torch.Tensor) -> torch.Tensor:
        return outputs_to_predictions(self.kind, self.model(image, image_present, clinical, clinical_mask))


def example_inputs(predictor) -> tuple[torch.Tensor, ...]:  # noqa: ANN001 - a Predictor
    size = tuple(predictor.config.image.size) if predictor.config.image is not None else (8, 8, 8)
    n_feat = predictor.pre.num_features if predictor.pre is not None else 0
    return (torch.zeros(1, 1, *size), torch.ones(1), torch.zeros(1, n_feat), torch.ones(1, n_feat))


def export_run(run_dir: Path, *, fmt: str, out: Path) -> Path:
    """Export ``run_dir``'s model to ``out`` (format ``torchscript`` or ``onnx``)."""
    from mmai.inference.predictor import Predictor

    predictor = Predictor(run_dir, device="cpu")
    module = _Exported(predictor.model, predictor.encoding.kind).eval()
    inputs = example_inputs(predictor)
    out = Path(out)
    with torch.no_grad(), atomic_path(out) as tmp:
        if fmt == "torchscript":
            traced = torch.jit.trace(module, inputs, check_trace=False)
            traced.save(str(tmp))
        elif fmt == "onnx":
            try:
                import onnx  # noqa: F401
            except ImportError as exc:
                raise MmaiError("ONNX export needs the onnx package: pip install onnx") from exc
            torch.onnx.export(module, inputs, str(tmp), input_names=["image", "image_present", "clinical",
                                                                      "clinical_mask"],
                              output_names=["prediction"], dynamo=False,
                              dynamic_axes={k: {0: "batch"} for k in ("image", "image_present", "clinical",
                                                                      "clinical_mask", "prediction")})
        else:
            raise MmaiError(f"--format {fmt!r} is not allowed; choose torchscript or onnx")
    return out
