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


class _Reader:
    """Bytes of a response body, read as asked: from ``resp.raw`` (urllib3: one read per part, no
    re-buffering) or from ``resp.iter_content`` chunks; ``buf[pos:]`` holds what was read ahead."""

    def __init__(self, resp: Any, chunk: int) -> None:
        raw = getattr(resp, "raw", None)
        if raw is not None and hasattr(raw, "read"):
            self._read: Callable[[int], bytes] = partial(raw.read, decode_content=True)
        else:
            chunks = resp.iter_content(chunk_size=chunk)
            self._read = lambda n: next(chunks, b"")
        self.chunk = chunk
        self.buf = bytearray()
        self.pos = 0

    def more(self, n: int | None = None) -> bool:
        """Read about ``n`` more bytes into the buffer (None: a chunk); False at the end of the body."""
        data = self._read(n or self.chunk)
        if not data:
            return False
        if self.pos:
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += data
        return True

    def until(self, mark: bytes, step: int) -> int:
        """The offset of ``mark`` in the buffer (reading ``step`` bytes at a time until it shows); -1 at the end."""
        scan = self.pos
        while True:
            at = self.buf.find(mark, scan)
            if at >= 0:
                return at
            scan = max(self.pos, len(self.buf) - len(mark) + 1)
            before = self.pos
            if not self.more(step):
                return -1
            scan -= before - self.pos  # the buffer may have been cut at its front

    def take(self, n: int) -> bytes:
        """Exactly ``n`` bytes (fewer only at the end of the body): the buffered ones, then one read."""
        have = len(self.buf) - self.pos
        if have >= n:
            out = bytes(self.buf[self.pos:self.pos + n])
            self.pos += n
            return out
        head = bytes(self.buf[self.pos:])
        self.buf.clear()
        self.pos = 0
        parts, need = [head] if head else [], n - have
        while need > 0:
            data = self._read(need)
            if not data:
                break
            parts.append(data)
            need -= len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def put_back(self, data: bytes) -> None:
        self.buf[self.pos:self.pos] = data


def _parts(resp: Any, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The bodies of a ``multipart/related`` response (RFC 2046), as they arrive; a single
    ``application/dicom`` body is yielded as is.

    A part whose headers give its ``Content-Length`` (Orthanc, dcm4chee) is read in one piece of that
    length, with no search for the boundary through its bytes; a part without one (or with a length
    the next boundary does not confirm) is cut at the next boundary."""
    ctype = resp.headers.get("Content-Type", "")
    if ctype.startswith("application/dicom"):
        yield resp.content
        return
    m = re.search(r'boundary="?([^";]+)"?', ctype)
    if not ctype.startswith("multipart/related") or not m:
        raise PacsError(f"WADO-RS answered with Content-Type {ctype!r}, not multipart/related DICOM")
    dash = b"--" + m.group(1).encode()
    delim = b"\r\n" + dash
    r = _Reader(resp, chunk)
    r.buf += b"\r\n"  # the first delimiter has no CRLF before it
    at = r.until(delim, 4096)
    while at >= 0:
        r.pos = at + len(delim)
        end = r.until(b"\r\n\r\n", 512)  # the part's headers (after the delimiter line)
        if end < 0 or r.buf[r.pos:r.pos + 2] == b"--":
            return  # the close delimiter (or a body cut short)
        headers = bytes(r.buf[r.pos:end]).lower()
        r.pos = end + 4
        length = re.search(rb"\ncontent-length:\s*(\d+)", headers)
        if length is not None:
            body = r.take(int(length.group(1)))
            if len(body) == int(length.group(1)):
                while len(r.buf) - r.pos < len(delim) and r.more(len(delim)):
                    pass
                if r.buf[r.pos:r.pos + len(delim)] == delim:
                    yield body
                    at = r.pos
                    continue
            r.put_back(body)  # the length was not followed by a boundary: cut at the boundary instead
        at = r.until(delim, chunk)
        if at < 0:
            return
        yield bytes(r.buf[r.pos:at])


def _reason(exc: Exception) -> str:
    resp = getattr(exc, "response", None)
    text = (resp.text if resp is not None else "") or str(exc)
    return " ".join(text.split())[:200]
