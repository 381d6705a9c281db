"""The exception tree. Every message names the bad value, the file or case, and the allowed set."""

from __future__ import annotations


class MmaiError(Exception):
    """Base class of every error mmai raises on purpose (the CLI prints these in one line)."""


class ConfigError(MmaiError):
    """A pipeline YAML (or a CLI option) is invalid: unknown key, wrong type, bad value."""


class ManifestError(MmaiError):
    """A manifest or clinical table is invalid; the message names the row and column."""


class ClinicalError(ManifestError):
    """A clinical value violates its declared schema (range, unparseable, unknown category)."""


class DicomError(MmaiError):
    """A DICOM file or series cannot be read or turned into a correct volume."""


class SeriesSelectionError(DicomError):
    """No series, or more than one, matched a selection rule; the message lists the candidates."""


class CheckpointError(MmaiError):
    """A run directory or checkpoint is missing, incomplete or incompatible."""


class PreprocessError(MmaiError):
    """A case failed during preprocessing (wraps the underlying reason with the case id)."""
