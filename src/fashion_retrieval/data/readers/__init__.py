"""Dataset readers: ``READERS.build(format_name, root=Path, **options) -> SampleTable``."""
from ...registry import Registry

READERS = Registry("dataset format")

# Importing the modules registers their readers.
from . import (catalog, clothing, darn, deepfashion, fashion_product, fashionai, street2shop,  # noqa: E402,F401
               viton)
