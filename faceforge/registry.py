"""A name -> factory registry, so that configs name their parts by string (timm's pattern).

One `Registry` style for every pluggable part: backbones (`backbones.BACKBONES`), heads (`heads.HEADS`),
training sets (`train.data.DATASETS`), samplers (`data.samplers.SAMPLERS`), objectives
(`train.objectives.OBJECTIVES`), optimisers and schedules (`train.optim.OPTIMIZERS`, `SCHEDULES`).

A name is either a registered one (case-insensitive) or ``"package.module:callable"``: a factory defined
outside faceforge, imported when it is asked for (nothing is imported at registration or at import time).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "import_spec", "is_spec"]


def is_spec(name: str) -> bool:
    """True for ``"package.module:callable"`` (a factory outside the registry), False for a registered name."""
    return ":" in name


def import_spec(spec: str) -> Any:
    """The object named by ``"package.module:callable"`` (dotted attributes allowed after the colon).

    Raises ValueError naming the spec when the module or the attribute cannot be imported.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{spec!r}: expected 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {spec!r} (expected 'package.module:callable'): {e}") from e
    return obj


class Registry(Generic[T]):
    """Maps a name to a factory. `register` is a decorator; `build(name, **kwargs)` calls the factory.

    An unknown name is a KeyError that lists every registered name; ``"package.module:callable"`` names a
    factory outside the registry (a ValueError when it cannot be imported).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            key = (name or factory.__name__).lower()
            if key in self._factories:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            if is_spec(key):
                raise ValueError(f"{self.kind} {key!r}: a registered name has no ':' (that names an import)")
            self._factories[key] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._factories

    def is_known(self, name: str) -> bool:
        """A registered name, or a ``"package.module:callable"`` spec (not imported here)."""
        return is_spec(name) or name in self

    def expected(self) -> str:
        """The words an error message uses for what a name may be."""
        return f"one of: {', '.join(self.names())}, or 'package.module:callable'"

    def get(self, name: str) -> Callable[..., T]:
        if is_spec(name):
            return import_spec(name)
        try:
            return self._factories[name.lower()]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; expected one of: {', '.join(self.names())}") from None

    def build(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)


def unknown_kwargs(factory: Callable[..., Any], kwargs: dict[str, Any], fixed: tuple[str, ...] = ()) -> list[str]:
    """The keys of ``kwargs`` that ``factory``'s signature does not take (none when it takes ``**kwargs``), and
    those among ``fixed``, which the caller passes itself (``context``, ``backbone``, ``head``): sorted."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        return sorted(k for k in kwargs if k in fixed)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return sorted(k for k in kwargs if k in fixed)
    names = {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                       inspect.Parameter.KEYWORD_ONLY)}
    return sorted(k for k in kwargs if k not in names or k in fixed)
