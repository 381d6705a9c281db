"""DIMSE (pynetdicom): C-FIND search, C-GET (or C-MOVE to mmai's own storage SCP) retrieve, C-STORE.

``AET@HOST:PORT`` names the PACS; ``calling_aet`` is mmai's AE title (the PACS must know it for
C-MOVE, with ``move_port`` as its port). Refused, aborted or timed-out associations are retried
(:mod:`mmai.pacs.retry`).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from typing import Any

from mmai.pacs.cache import StudyCache
from mmai.pacs.query import StudyRef
from mmai.pacs.retry import PacsError, RetryPolicy, TransientPacsError, with_retries

log = logging.getLogger(__name__)
_ADDR = re.compile(r"^(?P<aet>[^@\s]{1,16})@(?P<host>[^:\s]+):(?P<port>\d{1,5})$")
SUCCESS, PENDING = 0x0000, (0xFF00, 0xFF01)


def parse_address(text: str, option: str = "--dimse") -> tuple[str, str, int]:
    """``AET@HOST:PORT`` -> (aet, host, port); a one-line :class:`PacsError` otherwise."""
    m = _ADDR.match(text.strip())
    if not m or not 0 < int(m["port"]) < 65536:
        raise PacsError(f"{option} {text!r}: must look like AET@HOST:PORT (AE title of at most 16 characters, "
                        "port 1-65535), e.g. ORTHANC@pacs.example.org:4242")
    return m["aet"], m["host"], int(m["port"])


def _storage_classes() -> list[str]:
    """The storage SOP classes offered for C-GET / the C-MOVE SCP (images, SR, SEG, parametric maps)."""
    from pynetdicom import sop_class as sc

    names = ["CTImageStorage", "EnhancedCTImageStorage", "MRImageStorage", "EnhancedMRImageStorage",
             "PositronEmissionTomographyImageStorage", "EnhancedPETImageStorage", "NuclearMedicineImageStorage",
             "ComputedRadiographyImageStorage", "DigitalXRayImageStorageForPresentation",
             "DigitalXRayImageStorageForProcessing", "UltrasoundImageStorage", "UltrasoundMultiFrameImageStorage",
             "SecondaryCaptureImageStorage", "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
             "MultiFrameGrayscaleWordSecondaryCaptureImageStorage", "MultiFrameTrueColorSecondaryCaptureImageStorage",
             "ComprehensiveSRStorage", "Comprehensive3DSRStorage", "EnhancedSRStorage", "BasicTextSRStorage",
             "SegmentationStorage", "ParametricMapStorage", "RTDoseStorage", "RTStructureSetStorage",
             "GrayscaleSoftcopyPresentationStateStorage", "EncapsulatedPDFStorage"]
    return [str(getattr(sc, n)) for n in names if hasattr(sc, n)]


class DimseSource:
    """A DIMSE peer (see the module docstring)."""

    protocol = "dimse"

    def __init__(self, address: str, calling_aet: str, policy: RetryPolicy, *, move_port: int | None = None,
                 option: str = "--dimse") -> None:
        self.aet, self.host, self.port = parse_address(address, option)
        if not 0 < len(calling_aet.strip()) <= 16:
            raise PacsError(f"--calling-aet {calling_aet!r}: an AE title has 1 to 16 characters")
        self.calling = calling_aet.strip()
        self.policy = policy
        self.move_port = move_port
        self._scp: Any = None
        self._sink: dict[str, Any] = {}  # the cache the C-MOVE SCP writes into (set per retrieval)
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return f"DIMSE {self.aet}@{self.host}:{self.port}"

    # ---------------------------------------------------------------- association

    def _ae(self) -> Any:
        try:
            from pynetdicom import AE
        except ImportError as exc:  # pragma: no cover - a dependency of mmai's pacs extra
            raise PacsError("--dimse needs the pynetdicom package: pip install 'mmai[pacs]'") from exc
        ae = AE(ae_title=self.calling)
        t = self.policy.timeout_s
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout, ae.connection_timeout = t, t, t, t
        ae.maximum_pdu_size = 0  # no limit: the peer may send each instance in one PDU
        return ae

    def _associate(self, ae: Any, what: str, **kwargs: Any) -> Any:
        assoc = ae.associate(self.host, self.port, ae_title=self.aet, **kwargs)
        if not assoc.is_established:
            state = ("refused" if assoc.is_rejected else "aborted or unreachable" if assoc.is_aborted
                     else "not established")
            raise TransientPacsError(f"association with {self} {state} (calling AE {self.calling!r})")
        return assoc

    def _run(self, fn: Any, what: str) -> Any:
        return with_retries(fn, f"{self} {what}", self.policy)

    # ---------------------------------------------------------------- C-FIND

    def find(self, filters: dict[str, str]) -> list[StudyRef]:
        """C-FIND at STUDY level (Study Root) with the matching keys."""
        from pydicom import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND  # type: ignore[attr-defined]

        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        for key in ("StudyInstanceUID", "PatientID", "AccessionNumber", "StudyDate", "ModalitiesInStudy"):
            setattr(query, key, filters.get(key, ""))

        def attempt() -> list[StudyRef]:
            ae = self._ae()
            ae.add_requested_context(FIND)
            assoc = self._associate(ae, "C-FIND")
            found: list[StudyRef] = []
            try:
                for status, ident in assoc.send_c_find(query, FIND):
                    code = _status(status, "C-FIND")
                    if code in PENDING and ident is not None:
                        found.append(StudyRef.from_dataset(ident))
                    elif code != SUCCESS and code not in PENDING:
                        raise PacsError(f"{self} C-FIND failed with status 0x{code:04X}")
            finally:
                assoc.release()
            return found

        return self._run(attempt, "C-FIND")

    # ---------------------------------------------------------------- C-GET / C-MOVE

    def retrieve(self, study_uid: str, cache: StudyCache) -> int:
        """C-GET (or C-MOVE when ``move_port`` is set) every instance of the study into the cache."""
        if self.move_port is not None:
            return self._run(lambda: self._move(study_uid, cache), f"C-MOVE study {study_uid}")
        return self._run(lambda: self._get(study_uid, cache), f"C-GET study {study_uid}")

    def _identifier(self, study_uid: str) -> Any:
        from pydicom import Dataset

        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = study_uid
        return ident

    def _get(self, study_uid: str, cache: StudyCache) -> int:
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET  # type: ignore[attr-defined]

        ae = self._ae()
        ae.add_requested_context(GET)
        classes = _storage_classes()
        for uid in classes:
            ae.add_requested_context(uid)
        roles = [build_role(uid, scp_role=True) for uid in classes]
        got: list[int] = [0]

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            cache.add(ds)
            got[0] += 1
            return SUCCESS

        assoc = self._associate(ae, "C-GET", ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            _check_retrieve(assoc.send_c_get(self._identifier(study_uid), GET), self, "C-GET", study_uid)
        finally:
            assoc.release()
        return got[0]

    def _start_scp(self) -> None:
        from pynetdicom import evt

        if self._scp is not None:
            return
        ae = self._ae()
        for uid in _storage_classes():
            ae.add_supported_context(uid)

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            with self._lock:
                cache = self._sink.get("cache")
            if cache is None:
                return 0xA700  # not expecting anything: refuse
            cache.add(ds)
            return SUCCESS

        host = "127.0.0.1" if self.host in ("127.0.0.1", "localhost") else "0.0.0.0"
        try:
            self._scp = ae.start_server((host, int(self.move_port or 0)), block=False,
                                        evt_handlers=[(evt.EVT_C_STORE, on_store)])
        except OSError as exc:
            raise PacsError(f"--move-port {self.move_port}: cannot listen on {host}:{self.move_port} ({exc})") from exc
        log.info("storage SCP %s listening on %s:%s for C-MOVE", self.calling, host, self.move_port)

    def _move(self, study_uid: str, cache: StudyCache) -> int:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE  # type: ignore[attr-defined]

        self._start_scp()
        before = cache.n_instances(study_uid)
        with self._lock:
            self._sink["cache"] = cache
        ae = self._ae()
        ae.add_requested_context(MOVE)
        assoc = self._associate(ae, "C-MOVE")
        try:
            _check_retrieve(assoc.send_c_move(self._identifier(study_uid), self.calling, MOVE), self, "C-MOVE",
                            study_uid)
        finally:
            assoc.release()
            with self._lock:
                self._sink.pop("cache", None)
        return cache.n_instances(study_uid) - before

    def close(self) -> None:
        if self._scp is not None:
            self._scp.shutdown()
            self._scp = None

    # ---------------------------------------------------------------- C-STORE

    def store(self, datasets: Sequence[Any]) -> None:
        """C-STORE each instance on one association."""
        if not datasets:
            return

        def attempt() -> None:
            ae = self._ae()
            for uid in sorted({str(ds.SOPClassUID) for ds in datasets}):
                ae.add_requested_context(uid, [str(ds.file_meta.TransferSyntaxUID) for ds in datasets
                                               if str(ds.SOPClassUID) == uid][:1] + ["1.2.840.10008.1.2.1"])
            assoc = self._associate(ae, "C-STORE")
            try:
                for ds in datasets:
                    code = _status(assoc.send_c_store(ds), "C-STORE")
                    if code != SUCCESS and not 0xB000 <= code <= 0xBFFF:  # B0xx: stored with a warning
                        raise PacsError(f"{self} refused instance {ds.SOPInstanceUID} (C-STORE status 0x{code:04X})")
            finally:
                assoc.release()

        self._run(attempt, f"C-STORE of {len(datasets)} instance(s)")


def _status(status: Any, what: str) -> int:
    """The status code of a DIMSE response; an empty one (timeout, abort) is transient."""
    if status is None or "Status" not in status:
        raise TransientPacsError(f"{what}: no response (timed out or the association was aborted)")
    return int(status.Status)


def _check_retrieve(responses: Any, source: Any, what: str, study_uid: str) -> None:
    """Walk the C-GET / C-MOVE responses; a failure or sub-operation failures are errors."""
    last = None
    for status, _ in responses:
        code = _status(status, what)
        last = status
        if code in PENDING:
            continue
        if code == SUCCESS:
            return
        failed = int(getattr(status, "NumberOfFailedSuboperations", 0) or 0)
        raise PacsError(f"{source} {what} of study {study_uid} failed with status 0x{code:04X} "
                        f"({failed} instance(s) failed)")
    if last is None:
        raise TransientPacsError(f"{what}: no response (timed out or the association was aborted)")
