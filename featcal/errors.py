"""Errors raised for bad input. Each message names what is at fault (task, block, module, shape)."""


class FeatCalError(ValueError):
    """Bad input to featcal: the message says which task, block, module or file and why."""


class UnsupportedModelError(FeatCalError):
    """No model-family adapter knows this architecture."""


class NonFiniteError(FeatCalError):
    """NaN or Inf reached the statistics of a module."""
