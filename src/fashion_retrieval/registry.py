"""Name → builder registries, so every model, loss, reader and store is built from config.

Unknown names and misspelled keyword arguments fail at build time with the offending name
and the closest valid alternative, before any data is read or any weights are allocated.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration names something that does not exist or has a wrong value."""


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(builder: Callable[..., T]) -> Callable[..., T]:
            key = name or getattr(builder, "__name__", None)
            if key in self._builders:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._builders[key] = builder
            return builder

        return decorator

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._builders:
            raise ConfigError(
                f"unknown {self.kind} '{name}'{_suggest(name, self.names())}; "
                f"known: {', '.join(self.names())}"
            )
        return self._builders[name]

    def build(self, name: str, /, **kwargs: Any) -> T:
        builder = self.get(name)
        check_kwargs(builder, kwargs, f"{self.kind} '{name}'")
        return builder(**kwargs)


def check_kwargs(builder: Callable[..., Any], kwargs: dict[str, Any], what: str) -> None:
    """Reject keyword arguments the builder does not accept, naming the first bad key."""
    target = builder.__init__ if inspect.isclass(builder) else builder
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in kwargs:
        if key not in allowed:
            raise ConfigError(
                f"unknown key '{key}' for {what}{_suggest(key, allowed)}; allowed: {', '.join(allowed)}"
            )


def _choices(names: list[str]) -> str:
    quoted = [f"'{n}'" for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def check_name(registry: Registry, name: str) -> str:
    """``name`` if ``registry`` knows it; else a ConfigError listing the names, for recipe fields
    validated when the recipe loads (``optim.name: unknown optimizer 'lamb'; should be 'adam', ...``)."""
    if name not in registry:
        raise ConfigError(f"unknown {registry.kind} {name!r}{_suggest(name, registry.names())}; "
                          f"should be {_choices(registry.names())}")
    return name
