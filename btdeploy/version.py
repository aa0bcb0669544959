"""btdeploy's version, in one place: pyproject.toml reads it, and records name it where btdeploy
runs from a checkout that is not installed."""

# Raised when what btdeploy writes changes for the same inputs: the pipeline reuses a graph only
# when the versions recorded with it (this one included) are today's.
__version__ = "0.2.7"
