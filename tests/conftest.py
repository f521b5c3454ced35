"""Triton kernels run in Triton's interpreter during the tests unless TRITON_INTERPRET is set.

The kernels are built when featcal.kernels is first imported, so the mode is fixed here, before
any test imports it. On a GPU machine, `TRITON_INTERPRET=0 python -m pytest -m cuda` runs the
compiled kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
