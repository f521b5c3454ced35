"""Public path of the memory plan (`featcal.pipeline.memory_plan`)."""

from .pipeline.memory_plan import MemoryPlan, choose_placement, estimate
from .sizes import human, parse_bytes

__all__ = ["MemoryPlan", "choose_placement", "estimate", "human", "parse_bytes"]
