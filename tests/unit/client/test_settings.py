"""Settings from LORRY_* variables: lists, ~ expansion, refusals naming the variable."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from lorry.settings import Settings


def test_environment_variables_are_read(monkeypatch, tmp_path):
    monkeypatch.setenv("LORRY_ADAPTER_ROOTS", f"{tmp_path}/a:{tmp_path}/b")
    monkeypatch.setenv("LORRY_DATABASE_URL", "sqlite:///~/lorry-settings-test/x.db")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LORRY_MAX_LORAS", "16")
    s = Settings()
    assert s.adapter_roots == [f"{tmp_path}/a", f"{tmp_path}/b"]
    assert s.database_url == f"sqlite:///{tmp_path}/lorry-settings-test/x.db"
    assert (tmp_path / "lorry-settings-test").is_dir() and s.max_loras == 16
    monkeypatch.setenv("LORRY_ADAPTER_ROOTS", '["/x", "/y"]')
    assert Settings().adapter_roots == ["/x", "/y"]


def test_bad_values_are_refused_with_the_field(monkeypatch):
    monkeypatch.setenv("LORRY_MAX_NUM_SEQS", "0")
    with pytest.raises(ValidationError, match="max_num_seqs"):
        Settings()
