"""The registry of search methods: name, config dataclass, description, implementation.

A method is one module in :mod:`mpqkit.search.methods`; it registers itself when imported::

    @dataclass
    class MyConfig:
        weight: float = field(default=1.0, metadata={"help": "weight of my loss term"})

    @register_method("mine", config=MyConfig, description="my method (venue)")
    class Mine(SupernetMethod):           # a class: trained by the shared supernet loop
        def loss(self, ctx, supernet, x, y): ...

    @register_method("scored", description="...")
    def scored(ctx: SearchContext) -> MethodResult: ...   # a function: returns a policy

Every module of :mod:`mpqkit.search.methods` is imported on the first lookup, so a new method
needs no edit anywhere else: ``mpqkit search --method NAME`` finds it, the CLI builds its flags
from the config's fields (``--weight``) and its help from ``description``, and
``SearchConfig.options`` holds the method's config (``options:`` in YAML).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mpqkit.engine.config import from_dict
from mpqkit.errors import ConfigError

METHODS_PACKAGE = "mpqkit.search.methods"


@dataclass(frozen=True)
class MethodSpec:
    """One registered search method."""

    name: str
    impl: Any  # a SupernetMethod subclass, or a function ``fn(ctx) -> Policy | MethodResult``
    config: type | None  # the dataclass of the method's own options (None: it has none)
    description: str

    @property
    def is_supernet(self) -> bool:
        """Trained by the shared supernet loop (a class), or a policy function."""
        return isinstance(self.impl, type)

    def make_options(self, value: Any) -> Any:
        """The method's config from ``value`` (None, a mapping, or an instance)."""
        if self.config is None:
            if value:
                raise ConfigError(f"method {self.name} takes no options, got {dict(value)!r}")
            return None
        if value is None:
            return self.config()
        if isinstance(value, self.config):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"options of method {self.name} must be a mapping, got {value!r}")
        return from_dict(self.config, value, f"options ({self.name})")

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config)] if self.config else []


_REGISTRY: dict[str, MethodSpec] = {}
_loaded = False


def register_method(name: str, *, config: type | None = None,
                    description: str = "") -> Callable[[Any], Any]:
    """Decorator: make ``mpqkit search --method NAME`` run the decorated class or function."""
    key = name.strip().lower()
    if config is not None and not dataclasses.is_dataclass(config):
        raise TypeError(f"the config of search method {key!r} must be a dataclass")

    def deco(impl: Any) -> Any:
        doc = (getattr(impl, "__doc__", "") or "").strip().split("\n")[0]
        _REGISTRY[key] = MethodSpec(key, impl, config, description or doc)
        return impl

    return deco


def _load_methods() -> None:
    global _loaded
    if _loaded:
        return
    pkg = importlib.import_module(METHODS_PACKAGE)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{METHODS_PACKAGE}.{info.name}")
    _loaded = True


def method_specs() -> list[MethodSpec]:
    """Every registered method, by name."""
    _load_methods()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def available_methods() -> list[str]:
    """Names of the registered search methods."""
    return [m.name for m in method_specs()]


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``; a one-line error listing the known ones otherwise."""
    _load_methods()
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown search method {name!r}: use one of "
                          f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]
