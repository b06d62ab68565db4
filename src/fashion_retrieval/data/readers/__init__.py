"""Dataset readers: ``READERS.build(format_name, root=Path, **options) -> SampleTable``."""
from ...registry import Registry

READERS = Registry("dataset format")

# Importing the modules registers their readers.
from . import deepfashion, street2shop, fashionai, darn, shared, catalog  # noqa: E402,F401
