"""Models built by name from config: ``MODELS.build(name, num_items=..., attribute_sizes=..., **cfg)``."""
from ..registry import Registry

MODELS = Registry("model")

# Importing the modules registers their models.
from . import global_net, mmfl_net, asen, m3_net  # noqa: E402,F401
