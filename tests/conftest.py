"""Shared fixtures: a private cache for every test session, and the paths of the shared real data."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
CIFAR_JPG = SHARED / "datasets" / "cifar10-jpg.tar.gz"


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Tests never read or write the user's ~/.cache/vitkit."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VITKIT_CACHE", str(tmp_path_factory.mktemp("vitkit-cache")))
    yield
    mp.undo()


requires_cifar = pytest.mark.skipif(
    not CIFAR_JPG.is_file(), reason=f"the CIFAR-10 copy is not at {CIFAR_JPG} (see ../shared/datasets/README.md)"
)
