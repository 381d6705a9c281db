"""Hospital integration: studies from a PACS (DICOMweb or DIMSE) into ``mmai predict`` /
``mmai preprocess``, and results back to a PACS as DICOM Structured Reports (docs/pacs.md).

Modules: :mod:`~mmai.pacs.options` (the CLI options, import-light), :mod:`~mmai.pacs.query`
(filters and study lists), :mod:`~mmai.pacs.retry` (errors, retries with backoff),
:mod:`~mmai.pacs.cache` (instances by SOPInstanceUID), :mod:`~mmai.pacs.dicomweb` and
:mod:`~mmai.pacs.dimse` (the two protocols), :mod:`~mmai.pacs.sr` (the result SR and its UIDs),
:mod:`~mmai.pacs.predict` (the per-study loop over the folder predictor).
"""
