"""The fast paths of PACS prediction without a server: the SR built from UID-only evidence,
the cache writes WADO-RS parts from their file meta, the multipart split, and a batched store whose
server refuses one study."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pydicom
import pytest

from mmai.pacs.cache import OWN_CLASSES, StudyCache, file_meta_uids
from mmai.pacs.dicomweb import _parts
from mmai.pacs.retry import PacsError, TransientPacsError
from mmai.pacs.sr import InstanceRef, build_sr, derived_uid, read_sr_values
from mmai.pacs.store import Ledger
from tests.pacs.test_pacs_units import _instance, _uid


def _flat(ds, prefix=""):
    """Every element as ``path -> text`` in dataset order (sequences by item)."""
    out = {}
    for e in ds:
        if e.VR == "SQ":
            out[prefix + e.keyword] = len(e.value)
            for i, item in enumerate(e.value):
                out.update(_flat(item, f"{prefix}{e.keyword}[{i}]."))
        else:
            out[prefix + e.keyword] = str(e.value)
    return out


@pytest.mark.parametrize("kind", ["binary", "survival"])
def test_sr_from_uid_only_evidence_equals_the_sr_from_full_headers(kind):
    """The store thread passes the first header and the other instances by their UIDs only
    (InstanceRef, no re-read of the cache): highdicom must build the same SR as from every header."""
    study = _uid()
    src = [_instance(study, study + ".5", k) for k in range(5)]
    src[0].Manufacturer, src[0].InstitutionName = "ACME", "General Hospital"
    src[0].StudyDescription, src[0].PatientAge, src[0].PatientIdentityRemoved = "CT CHEST", "061Y", "YES"
    refs = [src[0], *(InstanceRef(str(d.StudyInstanceUID), str(d.SeriesInstanceUID), str(d.SOPClassUID),
                                  str(d.SOPInstanceUID)) for d in src[1:])]
    if kind == "binary":
        row = {"case_id": "c1", "prob_0": 0.123456789012345, "prob_1": 0.876543210987655, "prediction": "1",
               "clinical_present": 1, "input_flags": "lost_slices=1", "model_id": "m-1"}
    else:
        row = {"case_id": "c1", "risk": -0.4321, "surv_365": 0.9, "surv_730": 0.8, "clinical_present": 0,
               "input_flags": "", "model_id": "m-1"}
    ours = build_sr(row, refs, model_id="m-1", version="9.9", kind=kind)
    full = build_sr(row, src, model_id="m-1", version="9.9", kind=kind)
    a, b = _flat(ours), _flat(full)
    assert list(a) == list(b)
    times = {"InstanceCreationTime", "ContentTime", "InstanceCreationDate", "ContentDate"}
    assert {k for k in a if a[k] != b[k] and k.split(".")[-1] not in times | {"ContributionDateTime"}} == set()
    evidence = {str(i.ReferencedSOPInstanceUID) for s in ours.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert evidence == {str(d.SOPInstanceUID) for d in src}
    assert a["PatientAge"] == "061Y" and a["StudyDescription"] == "CT CHEST" and a["PatientIdentityRemoved"] == "YES"
    values = read_sr_values(ours)
    assert values["model_id"] == "m-1"
    assert values.get("prob_1", values.get("risk")) == pytest.approx(row.get("prob_1", row.get("risk")), abs=1e-9)
    buf = io.BytesIO()
    ours.save_as(buf, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    assert read_sr_values(back)["model_id"] == "m-1" and back.file_meta.MediaStorageSOPInstanceUID == ours.SOPInstanceUID


def _part10(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_study_parts_are_written_by_their_file_meta(tmp_path):
    study = _uid()
    insts = [_instance(study, study + ".1", k) for k in range(3)]
    own = _instance(study, study + ".9", 1)
    own.SOPClassUID = own.file_meta.MediaStorageSOPClassUID = sorted(OWN_CLASSES)[0]
    own.Manufacturer = "mmai"
    other_sr = _instance(study, study + ".8", 1)  # someone else's SR: same class, not mmai's
    other_sr.SOPClassUID = other_sr.file_meta.MediaStorageSOPClassUID = sorted(OWN_CLASSES)[0]
    parts = [_part10(ds) for ds in (*insts, own, other_sr)]
    assert file_meta_uids(parts[0]) == (str(insts[0].SOPClassUID), str(insts[0].SOPInstanceUID))
    assert file_meta_uids(b"not dicom") is None
    implicit = bytearray(parts[0])  # a file meta group written implicit VR: not trusted, pydicom reads the file
    implicit[132 + 4:132 + 8] = (4).to_bytes(4, "little")
    assert file_meta_uids(bytes(implicit)) is None
    cache = StudyCache(tmp_path / "c", max_bytes=10**9)
    assert cache.add_study_parts(study, parts) == 5
    names = sorted(p.stem for p in cache.study_dir(study).glob("*.dcm"))
    assert names == sorted([str(d.SOPInstanceUID) for d in insts] + [str(other_sr.SOPInstanceUID)])
    assert cache.size() == sum(len(p) for p in parts[:3]) + len(parts[4])
    first = cache.study_dir(study) / f"{insts[0].SOPInstanceUID}.dcm"
    mtime = first.stat().st_mtime_ns
    assert cache.add_study_parts(study, parts[:1]) == 1 and first.stat().st_mtime_ns == mtime  # not rewritten
    assert not list(cache.study_dir(study).glob(".*"))  # no temporary file left
    with pytest.raises(PacsError, match="not a DICOM file"):
        cache.add_study_parts(study, [b"\x00" * 200])
    cache.release(study)
    assert cache.size() == 0 and not cache.study_dir(study).exists()


class _Chunks:
    def __init__(self, body: bytes, size: int) -> None:
        self.body, self.size = body, size
        self.headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b0und'}

    def iter_content(self, chunk_size):
        for i in range(0, len(self.body), self.size):
            yield self.body[i:i + self.size]


@pytest.mark.parametrize("size", [1, 3, 64, 1000, 10**6])
def test_multipart_split_at_any_chunk_size(size):
    bodies = [bytes(range(256)) * k for k in (0, 1, 3, 7)] + [b"x--b0und-ish"]  # a boundary lookalike inside
    stream = b"".join(b"--b0und\r\nContent-Type: application/dicom\r\n\r\n" + b + b"\r\n" for b in bodies) + b"--b0und--"
    assert list(_parts(_Chunks(stream, size))) == bodies


class _Refusing:
    """A sink that refuses the objects of one study (a non-transient failure) or is unreachable."""

    def __init__(self, bad: str | None = None, down: bool = False) -> None:
        self.bad, self.down, self.calls = bad, down, []

    def store(self, objects):
        self.calls.append([str(o.StudyInstanceUID) for o in objects])
        if self.down:
            raise PacsError("DICOMweb x store: cannot reach x (gave up after 2 attempt(s))") from TransientPacsError("x")
        if any(str(o.StudyInstanceUID) == self.bad for o in objects):
            raise PacsError(f"refused 1 instance(s) of study {self.bad}")


@pytest.mark.parametrize("down", [False, True])
def test_a_batch_the_server_refuses_in_part_fails_only_that_study(tmp_path, down):
    from mmai.pacs.predict import _Item, _send

    studies = [_uid() for _ in range(3)]
    items = [_Item(s, {"case_id": f"c{i}", "prob_0": 0.4, "prob_1": 0.6, "prediction": "1", "clinical_present": 1,
                       "model_id": "m"}, _instance(s, s + ".1", 1), [f"/c/{s}/1.2.3.dcm"], [])
             for i, s in enumerate(studies)]
    sink = _Refusing(bad=studies[1], down=down)
    ledger = Ledger(tmp_path / "stored.csv")
    predictor = SimpleNamespace(model_id="m", encoding=SimpleNamespace(kind="binary"))
    errs = _send((sink, "dest"), ledger, predictor, "9.9", items)
    if down:  # unreachable: one try of the whole batch, every study an error row
        assert len(sink.calls) == 1 and [e["case_id"] for e in errs] == ["c0", "c1", "c2"]
        assert not ledger.done
    else:  # refused: the batch, then each study alone
        assert sink.calls[0] == studies and len(sink.calls) == 4
        assert [e["case_id"] for e in errs] == ["c1"] and errs[0]["stage"] == "store"
        assert {s for s, _, _ in ledger.done} == {studies[0], studies[2]}
        assert all(ledger.has(s, derived_uid(s, "m", "sr"), "dest") for s in (studies[0], studies[2]))


class _Raw:
    """A urllib3-like body: ``read(n)`` returns at most ``n`` bytes, never more than ``size`` at once."""

    def __init__(self, body: bytes, size: int) -> None:
        self.body, self.size, self.at, self.calls = body, size, 0, 0

    def read(self, n, decode_content=True):
        self.calls += 1
        out = self.body[self.at:self.at + min(n, self.size)]
        self.at += len(out)
        return out


@pytest.mark.parametrize("size", [1, 7, 100, 10**6])
def test_multipart_parts_read_by_their_content_length(size):
    bodies = [bytes(range(256)) * k for k in (0, 1, 3, 700)] + [b"x\r\n--b0und-ish"]
    lengths = [len(b) for b in bodies]
    lengths[2] += 5  # a wrong Content-Length: the part is cut at the boundary instead
    stream = b"preamble\r\n" + b"".join(
        b"--b0und\r\nContent-Type: application/dicom\r\nContent-Length: %d\r\n\r\n" % n + b + b"\r\n"
        for b, n in zip(bodies, lengths, strict=True)) + b"--b0und--\r\n"
    resp = _Chunks(stream, size)
    resp.raw = _Raw(stream, size)
    assert list(_parts(resp, chunk=4096)) == bodies
    if size == 10**6:  # a 179 kB part is one read of its length, not searched 4 kB chunk by 4 kB chunk
        assert 0 < resp.raw.calls <= 2 * len(bodies) + 4
