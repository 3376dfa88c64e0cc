import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test touches the user's real cache: the default cache folder lives in the test's tmp_path."""
    monkeypatch.setenv("TORCHNORMFIT_CACHE", str(tmp_path / "default-cache"))
