"""Shared test set-up.

Triton kernels run in Triton's interpreter during the tests unless TRITON_INTERPRET is set.
The kernels are built when featcal.kernels is first imported, so the mode is fixed here, before
any test imports it. On a GPU machine, `TRITON_INTERPRET=0 python -m pytest -m cuda` runs the
compiled kernels.

Tests of the C++ extension (featcal._C) build it on first use and skip, naming the reason, when
it cannot be built; with FEATCAL_REQUIRE_EXTENSION=1 (as in CI) they fail instead.
"""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def cpp(monkeypatch):
    """featcal._C, with FEATCAL_BACKEND=auto so that ops dispatch to it; a skip naming why it
    is missing (a failure under FEATCAL_REQUIRE_EXTENSION=1)."""
    from featcal import extension

    monkeypatch.setenv("FEATCAL_BACKEND", "auto")
    module = extension.load()
    if module is None:
        reason = f"featcal._C could not be built: {extension.error()}"
        if os.environ.get("FEATCAL_REQUIRE_EXTENSION") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return module


@pytest.fixture(params=["torch", "cpp"])
def solver(request, monkeypatch):
    """Each implementation of the solves in turn: 'torch' or 'cpp' (featcal._C)."""
    if request.param == "torch":
        monkeypatch.setenv("FEATCAL_BACKEND", "torch")
    else:
        request.getfixturevalue("cpp")
    return request.param
