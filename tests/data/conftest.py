import pytest


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keeps every data test away from the user's ~/.cache: default cache and data roots are temporary."""
    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("VITKIT_DATA", str(tmp_path_factory.mktemp("datasets")))
