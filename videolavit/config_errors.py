"""A configuration value the user has to change, raised wherever it is found to be wrong.

Stages and DataModules are built by LightningCLI, which wraps what their constructors raise in its own
argument errors; the CLI looks for this class in that chain and prints its message as one line (exit 2),
so a wrong value reads like any other argument error instead of a traceback.
"""


class StageConfigError(ValueError):
    """A stage or data config value that cannot work; the message names it and what to set instead."""
