"""The version of flarc (written into reports, manifests and outputs)."""

__version__ = "0.1.0"
