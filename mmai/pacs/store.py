"""Where result objects go: the source PACS, another one (``--store-to``), or local files (``--dry-run``),
and the ledger of what was stored (``<out>.stored.csv``) that makes a resumed run skip stored studies."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from mmai.pacs.cache import safe_uid
from mmai.pacs.retry import PacsError, RetryPolicy

log = logging.getLogger(__name__)
LEDGER_COLUMNS = ["study_uid", "sop_instance_uid", "destination"]


class Sink(Protocol):
    """Anything that stores DICOM instances (the sources do: STOW-RS or C-STORE)."""

    def store(self, datasets: Sequence[Any]) -> None: ...


class FolderSink:
    """``--dry-run``: write ``DIR/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` instead of sending."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __str__(self) -> str:
        return f"folder {self.root}"

    def store(self, datasets: Sequence[Any]) -> None:
        for ds in datasets:
            path = self.root / safe_uid(ds.StudyInstanceUID, "StudyInstanceUID") / \
                f"{safe_uid(ds.SOPInstanceUID, 'SOPInstanceUID')}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)


def make_peer(address: str, policy: RetryPolicy, *, calling_aet: str = "MMAI", move_port: int | None = None,
              option: str = "--store-to") -> Any:
    """A DICOMweb URL (``http(s)://...``) or a DIMSE ``AET@HOST:PORT`` as a source / sink."""
    if address.startswith(("http://", "https://")):
        from mmai.pacs.dicomweb import DicomWebSource

        return DicomWebSource(address, policy)
    if "@" in address:
        from mmai.pacs.dimse import DimseSource

        return DimseSource(address, calling_aet, policy, move_port=move_port, option=option)
    raise PacsError(f"{option} {address!r}: give a DICOMweb URL (http(s)://HOST[:PORT]/PATH) or a DIMSE "
                    "address AET@HOST:PORT")


class Ledger:
    """``<out>.stored.csv``: one row per stored object, appended as it is stored (a killed run keeps it)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.done: set[tuple[str, str, str]] = set()
        if self.path.exists() and self.path.stat().st_size:
            data = self.path.read_bytes()
            if not data.endswith(b"\n"):  # a kill while writing the last row: drop it (that object is resent)
                with self.path.open("r+b") as fh:
                    fh.truncate(data.rfind(b"\n") + 1)
            with self.path.open(newline="") as fh:
                for row in csv.DictReader(fh):
                    if row.get("destination") is not None:
                        self.done.add((row["study_uid"], row["sop_instance_uid"], row["destination"]))

    def has(self, study_uid: str, sop_uid: str, destination: str) -> bool:
        return (study_uid, sop_uid, destination) in self.done

    def add(self, study_uid: str, sop_uid: str, destination: str) -> None:
        self.add_many([(study_uid, sop_uid, destination)])

    def add_many(self, rows: list[tuple[str, str, str]]) -> None:
        """Record stored objects, each a (study UID, SOP instance UID, destination)."""
        if not rows:
            return
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            if new:
                w.writerow(LEDGER_COLUMNS)
            w.writerows(rows)
        self.done.update(rows)
