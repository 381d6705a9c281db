"""Input guards: refuse a series of a modality the pipeline is not for."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import MapTransform

from mmai.errors import PreprocessError

MODALITY_KEY = "modality"


class ModalityGuardd(MapTransform):
    """Check the loaded series' DICOM Modality against the pipeline's ``image.modality``.

    A NIfTI input carries no modality (''): it is taken to be the pipeline's. Writes the modality
    (the series', else the pipeline's, else ``unknown``) to ``data["modality"]``.
    """

    def __init__(self, keys: Any, expected: str = "any") -> None:
        super().__init__(keys)
        self.expected = expected

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d: dict[Hashable, Any] = dict(data)
        for k in self.key_iterator(d):
            meta = getattr(d[k], "meta", {}) or {}
            found = str(meta.get("modality", "") or "").upper()
            if self.expected != "any" and found and found != self.expected:
                name = meta.get("filename_or_obj", "image")
                raise PreprocessError(f"{name}: series modality is {found}, this pipeline is for "
                                      f"{self.expected} (image.modality); allowed: {self.expected}")
            d[MODALITY_KEY] = found or (self.expected if self.expected != "any" else "unknown")
        return d
