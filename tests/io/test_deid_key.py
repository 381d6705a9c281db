"""Pseudonyms keyed by a site secret: --salt-file, MMAI_PSEUDONYM_KEY, and a warning (once) when
the public default salt is used (issue 10: anyone could recompute pseudonyms from a PatientID)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging

import pandas as pd
import pytest

from mmai.cli import main
from mmai.errors import ConfigError
from mmai.io import deid
from mmai.io.deid import DEFAULT_SALT, KEY_ENV, pseudonym, read_salt_file, set_pseudonym_key
from tests.io.test_dicom_scan import make_series

SECRET = "0123456789abcdef-site-secret"


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setitem(deid._state, "key", None)
    monkeypatch.setitem(deid._state, "warned", False)


def _hmac(key: str, value: str) -> str:
    return "p-" + hmac.new(key.encode(), value.encode(), hashlib.sha256).hexdigest()[:16]


def test_default_salt_warns_once(caplog):
    with caplog.at_level(logging.WARNING, logger="mmai.io.deid"):
        a, b = pseudonym("PID-1"), pseudonym("PID-2")
    assert a == _hmac(DEFAULT_SALT, "PID-1") and b == _hmac(DEFAULT_SALT, "PID-2")
    warnings = [r for r in caplog.records if "public default salt" in r.getMessage()]
    assert len(warnings) == 1 and KEY_ENV in warnings[0].getMessage()


def test_env_var_holds_the_secret_itself(monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with caplog.at_level(logging.WARNING, logger="mmai.io.deid"):
        assert pseudonym("PID-1") == _hmac(SECRET, "PID-1") != _hmac(DEFAULT_SALT, "PID-1")
    assert not caplog.records


def test_set_key_wins_over_env_and_explicit_default_means_in_force(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "another-secret-of-enough-length")
    set_pseudonym_key(SECRET)
    assert pseudonym("PID-1") == pseudonym("PID-1", DEFAULT_SALT) == _hmac(SECRET, "PID-1")
    assert pseudonym("PID-1", salt="explicit") == _hmac("explicit", "PID-1")


def test_salt_file_and_short_secrets(tmp_path, monkeypatch):
    (tmp_path / "salt").write_text(f"  {SECRET}\n")
    assert read_salt_file(tmp_path / "salt") == SECRET
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ConfigError, match="at least 16"):
        read_salt_file(tmp_path / "short")
    with pytest.raises(ConfigError, match="not a file"):
        read_salt_file(tmp_path)
    monkeypatch.setenv(KEY_ENV, "abc")
    with pytest.raises(ConfigError, match=KEY_ENV):
        pseudonym("PID-1")


def test_scan_with_salt_file_writes_keyed_pseudonyms_and_resets(tmp_path, caplog):
    make_series(tmp_path / "in", k=3, patient_id="PID-12345")
    (tmp_path / "salt").write_text(SECRET)
    with caplog.at_level(logging.WARNING, logger="mmai.io.deid"):
        assert main(["scan", str(tmp_path / "in"), "--out", str(tmp_path / "i.csv"), "-q",
                     "--salt-file", str(tmp_path / "salt")]) == 0
    assert not [r for r in caplog.records if "public default salt" in r.getMessage()]
    assert pd.read_csv(tmp_path / "i.csv")["patient_id"].iloc[0] == _hmac(SECRET, "PID-12345")
    assert deid._state["key"] is None  # the CLI's key does not leak into later calls
    assert main(["scan", str(tmp_path / "in"), "--out", str(tmp_path / "j.csv"), "-q"]) == 0
    assert pd.read_csv(tmp_path / "j.csv")["patient_id"].iloc[0] == _hmac(DEFAULT_SALT, "PID-12345")


def test_convert_with_salt_file_keys_the_sidecar_in_its_workers(tmp_path):
    make_series(tmp_path / "in" / "a", k=3, patient_id="PID-12345")
    make_series(tmp_path / "in" / "b", k=3, patient_id="PID-67890", prefix="B")
    (tmp_path / "salt").write_text(SECRET)
    assert main(["convert", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--workers", "2", "-q",
                 "--salt-file", str(tmp_path / "salt")]) == 0
    keys = sorted(json.loads(p.read_text())["PatientKey"] for p in (tmp_path / "out").rglob("*.json"))
    assert keys == sorted([_hmac(SECRET, "PID-12345"), _hmac(SECRET, "PID-67890")])
