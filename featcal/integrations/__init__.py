"""featcal inside other tools' workflows: mergekit's outputs and FusionBench's algorithm API."""
