"""mmai predict's start-up settings (mmai.inference.startup): huge pages off for numpy, no garbage
collection while importing."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

from mmai.inference.startup import HUGEPAGE_ENV, prefer_small_pages, quiet_imports

ROOT = Path(__file__).resolve().parents[2]


def _fresh(code: str, env: dict[str, str]) -> str:
    """stdout of ``code`` in a fresh interpreter (numpy not imported yet) with ``env``."""
    base = {k: v for k, v in os.environ.items() if k != HUGEPAGE_ENV}
    r = subprocess.run([sys.executable, "-c", code], env={**base, **env, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, check=True)
    return r.stdout.strip()


_PROBE = ("from mmai.inference.startup import prefer_small_pages\n"
          "applied = prefer_small_pages()\n"
          "import os, numpy as np\n"
          "from numpy._core.multiarray import _set_madvise_hugepage\n"
          "on = _set_madvise_hugepage(True)\n"  # returns the setting numpy had
          "print(applied, os.environ.get('NUMPY_MADVISE_HUGEPAGE'), on)\n")


def test_small_pages_before_numpy_turns_numpy_hugepages_off() -> None:
    assert _fresh(_PROBE, {}) == "True 0 False"


def test_small_pages_keeps_the_users_setting() -> None:
    assert _fresh(_PROBE, {HUGEPAGE_ENV: "1"}) == "False 1 True"


def test_small_pages_after_numpy_changes_nothing(monkeypatch) -> None:
    monkeypatch.delenv(HUGEPAGE_ENV, raising=False)
    assert "numpy" in sys.modules  # pytest's process: too late
    assert prefer_small_pages() is False
    assert HUGEPAGE_ENV not in os.environ


def test_quiet_imports_turns_gc_off_inside_and_back_on_after() -> None:
    assert gc.isenabled()
    try:
        with quiet_imports(heavy=("not_imported_here",)):
            assert not gc.isenabled()
            made = [[] for _ in range(10)]
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
        del made
    finally:
        gc.unfreeze()


def test_quiet_imports_leaves_gc_off_when_it_was_off() -> None:
    gc.disable()
    try:
        with quiet_imports(heavy=("not_imported_here",)):
            pass
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()


def test_quiet_imports_changes_nothing_where_torch_is_imported_already() -> None:
    import torch  # noqa: F401 - imported, as in a test session or a notebook

    frozen = gc.get_freeze_count()
    with quiet_imports():
        assert gc.isenabled()
    assert gc.get_freeze_count() == frozen
