"""featcal: fast, memory-bounded FeatCal post-merging calibration (arXiv 2605.13030)."""

from .config import FeatCalConfig
from .errors import FeatCalError, NonFiniteError, UnsupportedModelError
from .merging import task_arithmetic, ties_merging
from .models.adapters import ModelAdapter, register_adapter
from .pipeline.driver import Calibrated, calibrate
from .pipeline.report import CalibrationReport

__version__ = "0.1.0"

__all__ = [
    "Calibrated",
    "CalibrationReport",
    "FeatCalConfig",
    "FeatCalError",
    "ModelAdapter",
    "NonFiniteError",
    "UnsupportedModelError",
    "calibrate",
    "register_adapter",
    "task_arithmetic",
    "ties_merging",
]
