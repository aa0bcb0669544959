"""btdeploy's version, in one place: pyproject.toml reads it, and records name it where btdeploy
runs from a checkout that is not installed."""

__version__ = "0.2.1"
