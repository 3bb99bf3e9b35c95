"""Model registry: `@register_model(name, Config)`, `create_model(name, **config)`, `list_models()`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import StrictConfig
from ..errors import ConfigError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config_cls: type[StrictConfig]
    builder: Callable[[Any], Any]
    description: str
    tiny: dict[str, Any]  # a small config for fast tests over the whole registry


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, config_cls: type[StrictConfig], description: str = "", tiny: dict[str, Any] | None = None):
    """Class decorator: the class is built as `cls(config)` and remembers its `arch` name."""

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        cls.arch = name
        doc = description or (cls.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = ModelEntry(name, config_cls, cls, doc, dict(tiny or {}))
        return cls

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(list_models())}") from None


def create_model(name: str, config: dict[str, Any] | None = None, **overrides: Any):
    """Build a registered model; unknown config keys raise ConfigError naming them."""
    entry = get_entry(name)
    cfg = entry.config_cls.from_dict(config, **overrides)
    return entry.builder(cfg)
