"""A name -> factory registry, so that configs name their parts by string (timm's pattern).

One `Registry` style for every pluggable part: backbones (`backbones.BACKBONES`), heads (`heads.HEADS`),
training sets (`train.data.DATASETS`), samplers (`data.samplers.SAMPLERS`), objectives
(`train.objectives.OBJECTIVES`), optimisers and schedules (`train.optim.OPTIMIZERS`, `SCHEDULES`).

A name is either a registered one (case-insensitive) or ``"package.module:callable"``: a factory defined
outside faceforge, imported when it is asked for (nothing is imported at registration or at import time).

**Trust.** An import is code. Names read from a file someone else may have written (``model.json``, a
safetensors header, the config stored in a checkpoint) are looked up inside :func:`untrusted`, where a
``"package.module:callable"`` is refused (:class:`UntrustedCodeError`) before anything is imported; only
registered names pass. The user's own YAML and command line are trusted code. ``trust_code=True`` (the
``--trust-code`` flag) or an enclosing :func:`trusting_code` lifts the refusal for one load; the environment
variable ``FACEFORGE_TRUSTED_MODULES`` (comma-separated module names, e.g. ``mypkg,lab.nets``) lifts it for
imports from those modules and their sub-modules, always (your own code, e.g. the backbone of your own runs).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import os
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")

__all__ = ["TRUSTED_MODULES_ENV", "Registry", "UntrustedCodeError", "import_spec", "is_spec", "trusting_code",
           "untrusted"]

TRUSTED_MODULES_ENV = "FACEFORGE_TRUSTED_MODULES"

# the file whose names are being looked up (None: the user's own config), and whether the user trusts code
_UNTRUSTED_SOURCE: contextvars.ContextVar[str | None] = contextvars.ContextVar("faceforge_untrusted", default=None)
_TRUST_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("faceforge_trust_code", default=False)


class UntrustedCodeError(ValueError):
    """A model file or checkpoint names code to import (``"package.module:callable"``) and is not trusted."""


def trusted_module(spec: str) -> bool:
    """True when the module of ``"package.module:callable"`` is one the user listed in ``FACEFORGE_TRUSTED_MODULES``
    (or a sub-module of one)."""
    module = spec.partition(":")[0]
    listed = [m.strip() for m in os.environ.get(TRUSTED_MODULES_ENV, "").split(",") if m.strip()]
    return any(module == m or module.startswith(m + ".") for m in listed)


@contextlib.contextmanager
def untrusted(source: str, trust_code: bool = False) -> Iterator[None]:
    """Registry names looked up inside come from ``source``, a file that may be someone else's: a
    ``"package.module:callable"`` is refused before it is imported, unless ``trust_code`` (or an
    enclosing :func:`trusting_code`) says the user trusts the file's author."""
    trusted = trust_code or _TRUST_CODE.get()
    token = _UNTRUSTED_SOURCE.set(None if trusted else source)
    try:
        yield
    finally:
        _UNTRUSTED_SOURCE.reset(token)


@contextlib.contextmanager
def trusting_code(trust: bool = True) -> Iterator[None]:
    """Inside, model files and checkpoints may name imports (``--trust-code``); ``trust=False`` changes nothing."""
    token = _TRUST_CODE.set(trust or _TRUST_CODE.get())
    try:
        yield
    finally:
        _TRUST_CODE.reset(token)


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
        """The factory of ``name``. Inside :func:`untrusted` an import is an :class:`UntrustedCodeError`."""
        if is_spec(name):
            source = _UNTRUSTED_SOURCE.get()
            if source is not None and not trusted_module(name):
                raise UntrustedCodeError(
                    f"{source}: {name!r} names code to import; a model file or checkpoint may name only "
                    f"a registered {self.kind} ({', '.join(self.names())}). Nothing was imported; if you trust "
                    f"its author, pass --trust-code (trust_code=True) or list the module in {TRUSTED_MODULES_ENV}")
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
