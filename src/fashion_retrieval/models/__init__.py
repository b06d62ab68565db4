"""Models built by name from config: ``MODELS.build(name, num_items=..., attribute_sizes=..., **cfg)``
returns a :class:`~fashion_retrieval.models.base.RetrievalModel`; :func:`build_model` is the same
from a recipe's or a checkpoint's stored arguments."""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Callable

from ..config import nest_backbone_options
from ..registry import Registry
from .base import RetrievalModel


def _nest_backbone(builder: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    # Only models built on a backbone take the section; a test model may well have its own
    # `pretrained` argument.
    target = builder.__init__ if inspect.isclass(builder) else builder
    if "backbone" not in inspect.signature(target).parameters:
        return kwargs
    return nest_backbone_options(kwargs)


MODELS: Registry[RetrievalModel] = Registry("model", expects=RetrievalModel, prepare=_nest_backbone)


def build_model(name: str, kwargs: dict[str, Any], attribute_names: Sequence[str] = (),
                initialise_backbone: bool = True) -> RetrievalModel:
    """``MODELS.build(name, **kwargs)`` with the label space's attribute names attached.
    ``initialise_backbone=False`` skips the backbone's pretrained initialisation (no download, no
    weights file read): for a model whose trained weights are loaded next."""
    kwargs = _nest_backbone(MODELS.get(name), dict(kwargs))
    if not initialise_backbone and "backbone" in kwargs:
        from .backbones import without_initialisation

        kwargs["backbone"] = without_initialisation(kwargs["backbone"])
    return MODELS.build(name, **kwargs).name_attributes(attribute_names)


# Importing the modules registers their models.
from . import global_net, mmfl_net, asen, m3_net, attribute_classifier  # noqa: E402,F401
