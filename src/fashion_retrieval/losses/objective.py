"""The training objective: a weighted sum of named loss terms, each logged on its own.

A term config names a registered loss and its weight, optionally a display ``label`` (needed
when the same loss appears twice, e.g. trihard on ``features`` and on ``branch_features``), and
the loss's own keyword arguments::

    - {name: trihard, weight: 1.0, margin: 0.3}
    - {name: trihard, weight: 1.0, label: trihard_branches, input: branch_features}
    - {name: center, weight: 0.0005, center_lr: 0.5}
    - {name: cross_entropy, weight: 1.0, label_smoothing: 0.1}

Loss kwargs may also come nested under ``kwargs:``. ``build_objective`` fills in what the model
knows (``num_classes``, ``embedding_size``, ``attribute_sizes``, ``feat_dim``) and what the
training table knows (``attribute_value_counts``, for frequency-weighted attribute BCE) for the
terms whose constructor names them; keys given by the user win.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..registry import ConfigError, check_kwargs
from . import LOSSES

CONTEXT_KEYS = ("num_classes", "embedding_size", "attribute_sizes", "feat_dim", "attribute_value_counts")


class Objective(nn.Module):
    """``forward(outputs, batch) -> (total, {label: value})``: total = Σ weight · term, and each
    term's unweighted value as a detached float for logging.

    Term parameters (centers, class weights, learned margins) are submodule parameters, so
    ``objective.parameters()`` hands them to the optimiser; ``parameter_groups()`` does the same
    but gives terms that ask for their own optimiser settings (``param_group_overrides``, e.g.
    the center loss's ``center_lr``) a group of their own.
    """

    def __init__(self, terms: Sequence[tuple[str, float, nn.Module]]):
        super().__init__()
        if not terms:
            raise ConfigError("the objective has no loss terms")
        labels = [label for label, _, _ in terms]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ConfigError(f"loss term label '{duplicates[0]}' is used twice; give the terms distinct 'label's")
        self.labels = labels
        self.weights = [float(weight) for _, weight, _ in terms]
        self.terms = nn.ModuleList(term for _, _, term in terms)

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        total: torch.Tensor | None = None
        values: dict[str, float] = {}
        device_type = _device_type(outputs)
        for label, weight, term in zip(self.labels, self.weights, self.terms):
            # Losses run in float32 even inside the engine's autocast: scaled cosine logits and
            # distance matrices lose too much in float16 (the terms cast their inputs up, but
            # autocast would cast matmuls back down).
            with torch.autocast(device_type=device_type, enabled=False):
                value = term(outputs, batch)
            values[label] = float(value.detach())
            weighted = weight * value
            total = weighted if total is None else total + weighted
        assert total is not None  # the constructor rejects an empty objective
        return total, values

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups: the common group (no overrides) and one per term with
        ``param_group_overrides``. Empty groups are left out."""
        common: list[nn.Parameter] = []
        groups: list[dict[str, Any]] = []
        for term in self.terms:
            params = [p for p in term.parameters() if p.requires_grad]
            overrides = getattr(term, "param_group_overrides", None)
            if overrides and params:
                groups.append({"params": params, **overrides})
            else:
                common.extend(params)
        return ([{"params": common}] if common else []) + groups

    def learned_values(self) -> dict[str, float]:
        """``{"<label>.<name>": value}`` of what terms learn besides weights (margins, scale) or
        follow on a schedule (SphereFace's softmax blend), from terms that define
        ``learned_values()``; the trainer logs them as ``learned.<label>.<name>``."""
        values: dict[str, float] = {}
        for label, term in zip(self.labels, self.terms):
            reporter = getattr(term, "learned_values", None)
            if reporter is not None:
                values.update({f"{label}.{name}": value for name, value in reporter().items()})
        return values

    def extra_repr(self) -> str:
        return ", ".join(f"{label}×{weight:g}" for label, weight in zip(self.labels, self.weights))


def _device_type(outputs: dict) -> str:
    for value in outputs.values():
        first = value[0] if isinstance(value, (list, tuple)) and value else value
        if isinstance(first, torch.Tensor):
            return first.device.type
    return "cpu"


def _as_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "model_dump"):  # pydantic v2 model (extras included when it allows them)
        return dict(config.model_dump())
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "__dict__"):
        return dict(vars(config))
    raise ConfigError(f"a loss term config must be a mapping, got {type(config).__name__}")


def _parse_term(config: Any) -> tuple[str, str, float, dict[str, Any]]:
    spec = _as_dict(config)
    name = spec.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a loss term config has no 'name': {spec}")
    weight = spec.pop("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise ConfigError(f"loss '{name}': weight must be a number >= 0, got {weight!r}")
    label = spec.pop("label", None) or name
    nested = spec.pop("kwargs", None) or {}
    if not isinstance(nested, Mapping):
        raise ConfigError(f"loss '{name}': 'kwargs' must be a mapping")
    overlap = sorted(set(spec) & set(nested))
    if overlap:
        raise ConfigError(f"loss '{name}': key '{overlap[0]}' given both directly and under kwargs")
    return name, str(label), float(weight), {**spec, **nested}


def build_term(name: str, kwargs: Mapping[str, Any], context: Mapping[str, Any] | None = None) -> nn.Module:
    """One registered loss term; context values go only to constructors that name them."""
    builder = LOSSES.get(name)  # ConfigError naming an unknown loss
    check_kwargs(builder, dict(kwargs), f"loss '{name}'")  # ConfigError naming an unknown key
    accepted = inspect.signature(builder).parameters
    from_context = {k: v for k, v in (context or {}).items() if k in accepted and k in CONTEXT_KEYS}
    return builder(**{**from_context, **kwargs})


def build_objective(terms: Iterable[Any], context: Mapping[str, Any] | None = None) -> Objective:
    """An ``Objective`` from term configs (mappings or pydantic models with ``name``, ``weight``,
    optional ``label`` and loss kwargs, flat or under ``kwargs``) and the model context."""
    built = []
    for config in terms:
        name, label, weight, kwargs = _parse_term(config)
        built.append((label, weight, build_term(name, kwargs, context)))
    return Objective(built)


__all__ = ["CONTEXT_KEYS", "Objective", "build_objective", "build_term"]
