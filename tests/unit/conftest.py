"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from agent import libcrypto


@pytest.fixture(params=["libcrypto", "pyca"])
def crypto_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each crypto backend in turn: the platform libcrypto (where it is OpenSSL 3) and pyca/cryptography, which the
    callers use where `libcrypto.load()` answers None."""
    name: str = request.param
    if name == "pyca":
        monkeypatch.setattr(libcrypto, "load", lambda: None)
    elif not libcrypto.available():
        pytest.skip("this Python's _hashlib is not linked against OpenSSL 3: only the pyca backend runs here")
    return name
