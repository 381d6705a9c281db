"""A real PACS for the tests: Orthanc on 127.0.0.1 (free ports, temporary storage), one per session.

Skipped with the reason when Orthanc or its DICOMweb plugin is not installed (``.ci/run`` installs
Debian's ``orthanc`` and ``orthanc-dicomweb``). Tests that need an empty server call ``clear()``.
"""

from __future__ import annotations

import pytest

from tests.inference.predict_world import world  # noqa: F401  (the shared tiny synth -> train world)
from tests.pacs.orthanc import Orthanc, start_orthanc, why_unavailable


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory) -> Orthanc:
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture
def empty_orthanc(orthanc: Orthanc) -> Orthanc:
    orthanc.clear()
    return orthanc
