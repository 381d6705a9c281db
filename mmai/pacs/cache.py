"""The local cache of retrieved instances: ``CACHE/<StudyInstanceUID>/<SOPInstanceUID>.dcm``.

One file per SOPInstanceUID, written atomically (a killed retrieval leaves no half file) and never
written twice, so a retrieval that is retried or resumed only adds what is missing. Each study
folder is a DICOM root that :func:`mmai.inference.dicom_cases.select_cases` reads unchanged. The
cache is bounded (``max_bytes``): before a study is fetched, the oldest finished study folders are
removed until the cache is under the bound; a study folder is removed once its study is done unless
the cache is kept (``keep``). Instances mmai made itself (``Manufacturer`` ``mmai`` and the SOP
class of a result: Comprehensive SR, Parametric Map, Secondary Capture, as an earlier run stored
them) are not cached, so results never become inputs of the series selection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmai.pacs.retry import PacsError

log = logging.getLogger(__name__)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
OWN_MANUFACTURER = "mmai"  # the Manufacturer of every object mmai stores (mmai.pacs.sr, mmai.pacs.pmap)
OWN_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.7"})


def is_own_result(ds: Any) -> bool:
    """True for a result object mmai stored (its manufacturer and one of its result SOP classes)."""
    return str(ds.get("Manufacturer", "")) == OWN_MANUFACTURER and str(ds.get("SOPClassUID", "")) in OWN_CLASSES


def safe_uid(uid: str, what: str) -> str:
    """A UID usable as a file name (digits and dots only), else a :class:`PacsError` naming it."""
    text = str(uid).strip()
    if not _UID.match(text) or len(text) > 64:
        raise PacsError(f"{what} {text!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    return text


def file_meta_uids(data: bytes) -> tuple[str, str] | None:
    """(MediaStorageSOPClassUID, MediaStorageSOPInstanceUID) from the file meta group of a DICOM Part 10
    file, read from the bytes without pydicom (the group is always explicit VR little endian); None when
    the bytes do not start like a Part 10 file or the group lacks either UID."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    pos, found = 132, {}
    while pos + 8 <= len(data) and data[pos:pos + 2] == b"\x02\x00":  # group 0002
        elem = int.from_bytes(data[pos + 2:pos + 4], "little")
        vr = data[pos + 4:pos + 6]
        if not vr.isalpha() or not vr.isupper():  # not explicit VR (a non-conformant file): let pydicom read it
            return None
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length, start = int.from_bytes(data[pos + 8:pos + 12], "little"), pos + 12
        else:
            length, start = int.from_bytes(data[pos + 6:pos + 8], "little"), pos + 8
        if elem in (2, 3):
            if vr != b"UI":
                return None
            found[elem] = data[start:start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    if 2 not in found or 3 not in found or not all(_UID.match(found[k]) for k in (2, 3)):
        return None
    return found[2], found[3]


class StudyCache:
    """Instances by SOPInstanceUID under ``root``, one folder per study (see the module docstring).

    The bytes held per study are counted as instances are written and folders removed (the folders
    found at start are measured once), so bounding the cache costs no walk of it per study. Safe to
    use from several retrieval threads."""

    def __init__(self, root: Path, *, max_bytes: int, keep: bool = False) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._bytes: dict[str, int] = {d.name: sum(f.stat().st_size for f in d.rglob("*.dcm"))
                                       for d in self.root.iterdir() if d.is_dir()}

    def _count(self, study_dir: Path, n: int) -> None:
        with self._lock:
            self._bytes[study_dir.name] = self._bytes.get(study_dir.name, 0) + n

    def study_dir(self, study_uid: str) -> Path:
        return self.root / safe_uid(study_uid, "StudyInstanceUID")

    def path_for(self, ds: Any) -> Path:
        """Where an instance (pydicom Dataset) lives: ``<study>/<sop>.dcm``."""
        return self.study_dir(str(ds.StudyInstanceUID)) / f"{safe_uid(ds.SOPInstanceUID, 'SOPInstanceUID')}.dcm"

    def add(self, ds: Any) -> Path | None:
        """Write one instance (with its file meta) unless its SOPInstanceUID is cached already or mmai
        made it (then None)."""
        if is_own_result(ds):
            return None
        path = self.path_for(ds)
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            ds.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._count(path.parent, path.stat().st_size)
        return path

    def _write(self, path: Path, data: bytes) -> None:
        """``data`` to ``path`` atomically (a killed retrieval leaves no half file)."""
        tmp = f"{path.parent}/.{path.name}.{os.getpid()}.{threading.get_ident()}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._count(path.parent, len(data))

    def add_bytes(self, data: bytes) -> Path | None:
        """Write one DICOM Part 10 file as received (its UIDs read from its header only); None for an
        instance mmai made.

        Raises:
            PacsError: the bytes are not a DICOM file with a StudyInstanceUID and SOPInstanceUID.
        """
        head = _header(data)
        if is_own_result(head):
            return None
        sop = head.get("SOPInstanceUID") or getattr(head.get("file_meta"), "MediaStorageSOPInstanceUID", None)
        if not head.get("StudyInstanceUID") or not sop:
            raise PacsError("a retrieved instance has no StudyInstanceUID or SOPInstanceUID")
        path = self.study_dir(str(head.StudyInstanceUID)) / f"{safe_uid(str(sop), 'SOPInstanceUID')}.dcm"
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write(path, data)
        return path

    def add_study_parts(self, study_uid: str, parts: Iterable[bytes]) -> int:
        """Write the Part 10 files of one study as they arrive (a WADO-RS study retrieval); the number of
        instances received (result objects mmai made are counted, not written).

        The folder is listed once, so an instance cached earlier is not written again; each file's
        SOPInstanceUID comes from its file meta group (no pydicom parse), except for the SOP classes
        of mmai's own results, whose Manufacturer is read to tell them from other SRs and maps.

        Raises:
            PacsError: a part is not a DICOM file with a SOPInstanceUID.
        """
        folder = self.study_dir(study_uid)
        folder.mkdir(parents=True, exist_ok=True)
        have = {e.name for e in os.scandir(folder)}
        n = 0
        for data in parts:
            n += 1
            uids = file_meta_uids(data)
            if uids is None or uids[0] in OWN_CLASSES:
                head = _header(data)  # no usable file meta, or perhaps one of mmai's results
                if is_own_result(head):
                    continue
                sop = head.get("SOPInstanceUID") or getattr(head.get("file_meta"), "MediaStorageSOPInstanceUID", None)
                if not sop:
                    raise PacsError(f"a retrieved instance of study {study_uid} has no SOPInstanceUID")
            else:
                sop = uids[1]
            name = f"{safe_uid(str(sop), 'SOPInstanceUID')}.dcm"
            if name not in have:
                self._write(folder / name, data)
                have.add(name)
        return n

    def n_instances(self, study_uid: str) -> int:
        d = self.study_dir(study_uid)
        return sum(1 for _ in d.glob("*.dcm")) if d.is_dir() else 0

    def size(self) -> int:
        """Bytes held (as counted; see the class docstring)."""
        with self._lock:
            return sum(self._bytes.values())

    def make_room(self, busy: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Remove the oldest study folders (except ``busy`` ones) until the cache is under its bound."""
        total = self.size()
        if total <= self.max_bytes:
            return
        dirs = sorted((d for d in self.root.iterdir() if d.is_dir() and d.name not in busy),
                      key=lambda d: d.stat().st_mtime)
        for d in dirs:
            if total <= self.max_bytes:
                break
            with self._lock:
                freed = self._bytes.pop(d.name, 0)
            shutil.rmtree(d, ignore_errors=True)
            total -= freed
            log.debug("cache over %d bytes: removed %s", self.max_bytes, d.name)
        if total > self.max_bytes:
            log.warning("the PACS cache %s holds %.1f MB, over its bound of %.1f MB, in studies still in use",
                        self.root, total / 1e6, self.max_bytes / 1e6)

    def release(self, study_uid: str) -> None:
        """A study is done: remove its folder unless the cache is kept."""
        if not self.keep:
            d = self.study_dir(study_uid)
            with self._lock:
                self._bytes.pop(d.name, None)
            shutil.rmtree(d, ignore_errors=True)

    def remove_if_empty(self) -> None:
        """Remove the cache folder when nothing is left in it (a run that kept nothing leaves no folder)."""
        if not self.keep and self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()


def _header(data: bytes) -> Any:
    """The UIDs, SOP class and manufacturer of a Part 10 file held in memory (pydicom, header only).

    Raises:
        PacsError: the bytes are not a DICOM file.
    """
    import io

    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                               specific_tags=["StudyInstanceUID", "SOPInstanceUID", "SOPClassUID", "Manufacturer"])
    except (InvalidDicomError, EOFError, ValueError, KeyError) as exc:
        raise PacsError(f"a retrieved part of {len(data)} bytes is not a DICOM file ({exc})") from exc
