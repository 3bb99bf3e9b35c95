"""Typed config dataclasses that reject unknown keys (silently ignored settings are a bug)."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping, TypeVar

from .errors import ConfigError

C = TypeVar("C", bound="StrictConfig")


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Coerce ints to floats where a float is declared, reject everything else that does not fit."""
    origin = typing.get_origin(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if isinstance(value, bool) and annotation is not bool:
            raise ConfigError(f"{name} must be {annotation.__name__}, got bool {value!r}")
        if not isinstance(value, annotation):
            raise ConfigError(f"{name} must be {annotation.__name__}, got {type(value).__name__} {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a sequence, got {type(value).__name__} {value!r}")
        args = typing.get_args(annotation)
        item = args[0] if args else Any
        return tuple(_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    return value


@dataclasses.dataclass(frozen=True)
class StrictConfig:
    """Base for every config: construct with `from_dict`, which names unknown keys."""

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any] | None = None, **overrides: Any) -> C:
        merged = {**(values or {}), **overrides}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - set(fields))
        if unknown:
            raise ConfigError(
                f"{cls.__name__}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}"
            )
        hints = typing.get_type_hints(cls)
        checked = {k: _check_type(f"{cls.__name__}.{k}", v, hints[k]) for k, v in merged.items()}
        return cls(**checked)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Subclasses raise ConfigError for values out of range."""
