"""Triton kernels for FeatCal's statistics (installed as `featcal.kernels`).

Each module holds one kernel family: the Triton kernel, its launcher, the public function and
the float64 PyTorch reference it must match. All accumulate into float32 buffers and read
float32, float16 or bfloat16 activations. `featcal.ops` is the only caller in the library.

Importing this package imports Triton. Whether the kernels run compiled (CUDA tensors) or in
Triton's interpreter (CPU tensors, for tests) is fixed when it is imported, by
`TRITON_INTERPRET=1` in the environment.
"""

from .column_sum import weighted_sum
from .launch import INTERPRETED, SUPPORTED_DTYPES
from .norm_statistics import norm_moments
from .weighted_product import mirror_lower, weighted_cross, weighted_gram

__all__ = [
    "INTERPRETED",
    "SUPPORTED_DTYPES",
    "mirror_lower",
    "norm_moments",
    "weighted_cross",
    "weighted_gram",
    "weighted_sum",
]
