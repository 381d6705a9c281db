"""Imaging and table I/O: DICOM scanning, series loading, selection, manifests."""
