"""Models as the run sees them: family adapters, module kinds, capture and replay of block
inputs, model sources and lazily read checkpoints."""
