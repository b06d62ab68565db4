"""Loss terms built by name from config; ``build_objective`` sums named, weighted terms."""
from ..registry import Registry

LOSSES = Registry("loss")

# Importing the modules registers their terms.
from . import metric, margin, attribute, objective  # noqa: E402,F401
