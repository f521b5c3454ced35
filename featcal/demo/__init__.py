"""The `featcal demo` benchmark: digits tasks, trained experts, their merge, and FeatCal."""

from .run import DemoConfig, run_demo, summary
from .training import QUICK_RECIPE, Recipe

__all__ = ["QUICK_RECIPE", "DemoConfig", "Recipe", "run_demo", "summary"]
