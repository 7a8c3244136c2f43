import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: one torch thread (``tests/conftest.py``)."""
    yield
