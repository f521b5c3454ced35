"""The forward-order run: the driver, the phases of a block, their typed state, the statistics,
the solves, the report and the memory plan."""
