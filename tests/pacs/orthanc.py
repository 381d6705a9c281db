"""A throwaway Orthanc PACS on 127.0.0.1 (Debian's ``orthanc`` + ``orthanc-dicomweb`` packages).

Used by the PACS tests (``tests/pacs/conftest.py``) and ``benchmarks/pacs_throughput.py``: free
HTTP and DICOM ports, storage in a temporary folder, a generated JSON configuration with the
DICOMweb plugin enabled, C-FIND / C-GET / C-MOVE / C-STORE allowed from any AE on 127.0.0.1, and
one known modality (``MMAI`` at a free port) as the C-MOVE destination.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PLUGIN_CANDIDATES = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)
ORTHANC_AET = "ORTHANC"
MOVE_AET = "MMAI"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or shutil.which("orthanc")


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin of the Debian package (``dpkg -L orthanc-dicomweb``), or None."""
    for p in PLUGIN_CANDIDATES:
        if p.exists():
            return p
    try:
        out = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    hits = [Path(line) for line in out.splitlines() if "DicomWeb" in line and ".so" in line]
    return hits[0] if hits else None


def why_unavailable() -> str | None:
    """None when Orthanc with the DICOMweb plugin can run here, else the reason (for pytest.skip)."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does it)"
    if dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


@dataclass
class Orthanc:
    """A running Orthanc: ``url`` (REST), ``dicomweb`` (DICOMweb root), DICOM ``aet``/``port``."""

    root: Path
    http_port: int
    dicom_port: int
    move_port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"{ORTHANC_AET}@127.0.0.1:{self.dicom_port}"

    def get(self, path: str) -> object:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes, content_type: str = "application/dicom") -> object:
        req = urllib.request.Request(self.url + path, data=body, method="POST",
                                     headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def delete(self, path: str) -> None:
        req = urllib.request.Request(self.url + path, method="DELETE")
        with urllib.request.urlopen(req, timeout=60):
            pass

    def instances(self) -> list[str]:
        return list(self.get("/instances"))  # type: ignore[arg-type]

    def clear(self) -> None:
        """Delete every patient (and so every study and instance)."""
        for pid in self.get("/patients"):  # type: ignore[union-attr]
            self.delete(f"/patients/{pid}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_orthanc(root: Path, *, timeout: float = 60.0) -> Orthanc:
    """Start Orthanc with storage and config under ``root``; wait until its REST API answers.

    Raises:
        RuntimeError: the binary or plugin is missing, or the server did not come up in ``timeout`` s
            (the message holds the end of its log).
    """
    reason = why_unavailable()
    if reason:
        raise RuntimeError(reason)
    root.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port, move_port = free_port(), free_port(), free_port()
    config = {
        "Name": "mmai-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "Plugins": [str(dicomweb_plugin())],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ORTHANC_AET,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomCheckModalityHost": False,
        "DicomModalities": {"mmai": [MOVE_AET, "127.0.0.1", move_port]},
        "OverwriteInstances": True,  # a result sent again with the same SOPInstanceUID replaces the old one
        "StorageCompression": False,
        "ConcurrentJobs": 2,
        "HttpThreadsCount": 8,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    }
    cfg = root / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    log = (root / "orthanc.log").open("wb")
    proc = subprocess.Popen([str(orthanc_binary()), str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(root))
    server = Orthanc(root=root, http_port=http_port, dicom_port=dicom_port, move_port=move_port, process=proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            server.get("/system")
            server.get("/plugins/dicom-web")
            return server
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    server.stop()
    tail = (root / "orthanc.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"Orthanc did not start within {timeout:.0f} s; its log ends with:\n{tail}")
