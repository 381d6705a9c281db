"""DICOMweb (dicomweb-client): QIDO-RS search, WADO-RS retrieve into the cache, STOW-RS store."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, TypeVar

from mmai.pacs.cache import StudyCache
from mmai.pacs.query import StudyRef
from mmai.pacs.retry import PacsError, RetryPolicy, TransientPacsError, with_retries

log = logging.getLogger(__name__)
T = TypeVar("T")
STUDY_FIELDS = ("StudyInstanceUID", "PatientID", "AccessionNumber", "StudyDate", "ModalitiesInStudy")
PAGE = 1000  # QIDO-RS page size (every page is fetched)


def _client_module() -> Any:
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError as exc:  # pragma: no cover - a dependency of mmai's pacs extra
        raise PacsError("--dicomweb needs the dicomweb-client package: pip install 'mmai[pacs]'") from exc
    return DICOMwebClient


class DicomWebSource:
    """A DICOMweb server at ``url`` (the service root, e.g. ``http://pacs:8042/dicom-web``)."""

    protocol = "dicomweb"

    def __init__(self, url: str, policy: RetryPolicy) -> None:
        if not url.startswith(("http://", "https://")):
            raise PacsError(f"--dicomweb {url!r}: give the service root URL, http(s)://HOST[:PORT]/PATH")
        self.url = url.rstrip("/")
        self.policy = policy
        self.client = _client_module()(self.url, timeout=policy.timeout_s)
        self._local = threading.local()

    def __str__(self) -> str:
        return f"DICOMweb {self.url}"

    def _call(self, fn: Callable[[], T], what: str) -> T:
        def attempt() -> T:
            import requests

            try:
                return fn()
            except requests.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                msg = f"HTTP {code} from {self.url}"
                if code >= 500 or code == 429:
                    raise TransientPacsError(msg) from exc
                raise PacsError(f"{what}: {msg} ({_reason(exc)})") from exc
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise TransientPacsError(f"cannot reach {self.url} ({type(exc).__name__})") from exc
            except requests.RequestException as exc:  # a broken transfer (chunked encoding, bad content)
                raise TransientPacsError(f"{type(exc).__name__} from {self.url}: {exc}") from exc
            except ValueError as exc:  # a response dicomweb-client cannot parse (not DICOM, not JSON)
                raise PacsError(f"{what}: {self.url} sent a response that is not DICOM ({exc})") from exc

        return with_retries(attempt, f"{self} {what}", self.policy)

    def find(self, filters: dict[str, str]) -> list[StudyRef]:
        """QIDO-RS study search with DICOM matching keys (every page)."""
        from pydicom import Dataset

        found: list[StudyRef] = []
        offset = 0
        while True:
            page = self._call(partial(self.client.search_for_studies, search_filters=dict(filters),
                                      fields=list(STUDY_FIELDS), limit=PAGE, offset=offset), "search")
            found += [StudyRef.from_dataset(Dataset.from_json(d)) for d in page]
            if len(page) < PAGE:
                return found
            offset += len(page)

    def _session(self) -> Any:
        """This thread's HTTP session (connections kept alive between studies; one per retrieval thread)."""
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = self._local.session = requests.Session()
        return session

    def retrieve(self, study_uid: str, cache: StudyCache) -> int:
        """WADO-RS: every instance of the study into the cache; returns the number of instances.

        The multipart response is split as it streams and each part (a DICOM Part 10 file) is written
        to the cache as received, without decoding and re-encoding it (the explicit VR little endian
        transfer syntax is asked for, so the server decompresses or transcodes if it must).
        """

        def fetch() -> int:
            url = f"{self.url}/studies/{study_uid}"
            accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
            with self._session().get(url, headers={"Accept": accept}, stream=True,
                                     timeout=self.policy.timeout_s) as resp:
                resp.raise_for_status()
                return cache.add_study_parts(study_uid, _parts(resp))

        return self._call(fetch, f"retrieve study {study_uid}")

    def store(self, datasets: Sequence[Any]) -> None:
        """STOW-RS: store the instances in one request (they may belong to several studies).

        Raises:
            PacsError: the request failed after the retries, or the server refused instances (the
                message names their studies and the failure reasons).
        """
        if not datasets:
            return
        studies = sorted({str(ds.StudyInstanceUID) for ds in datasets})
        where = f"study {studies[0]}" if len(studies) == 1 else f"{len(studies)} studies"
        resp = self._call(partial(self.client.store_instances, list(datasets),
                                  study_instance_uid=studies[0] if len(studies) == 1 else None),
                          f"store {len(datasets)} instance(s) in {where}")
        failed = resp.get("FailedSOPSequence") if resp is not None else None
        if failed:
            study_of = {str(ds.SOPInstanceUID): str(ds.StudyInstanceUID) for ds in datasets}
            refused = sorted({study_of.get(str(item.get("ReferencedSOPInstanceUID", "")), "?") for item in failed})
            reasons = [str(item.get("FailureReason", "?")) for item in failed]
            raise PacsError(f"{self} refused {len(failed)} instance(s) of study {', '.join(refused)} (failure "
                            f"reason {', '.join(reasons)})")


def _parts(resp: Any, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The bodies of a ``multipart/related`` response (RFC 2046), as they arrive; a single
    ``application/dicom`` body is yielded as is."""
    ctype = resp.headers.get("Content-Type", "")
    if ctype.startswith("application/dicom"):
        yield resp.content
        return
    m = re.search(r'boundary="?([^";]+)"?', ctype)
    if not ctype.startswith("multipart/related") or not m:
        raise PacsError(f"WADO-RS answered with Content-Type {ctype!r}, not multipart/related DICOM")
    delim = b"\r\n--" + m.group(1).encode()
    buf = bytearray(b"\r\n")  # the first delimiter has no CRLF before it
    scan = 0  # where the search for the next delimiter resumes (a long part is not searched twice)
    for data in resp.iter_content(chunk_size=chunk):
        buf += data
        start = buf.find(delim)
        if start < 0:
            continue
        while True:  # parts are sliced out by offset; the buffer is cut once per chunk
            end = buf.find(delim, max(start + len(delim), scan))
            if end < 0:
                scan = max(len(buf) - len(delim) + 1, 0)
                break
            scan = 0
            head_end = buf.find(b"\r\n\r\n", start + len(delim), end)
            if head_end >= 0:
                with memoryview(buf) as view:
                    part = bytes(view[head_end + 4:end])
                yield part
            start = end
        del buf[:start]
        scan = max(scan - start, 0)


def _reason(exc: Exception) -> str:
    resp = getattr(exc, "response", None)
    text = (resp.text if resp is not None else "") or str(exc)
    return " ".join(text.split())[:200]
