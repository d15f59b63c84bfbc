"""`--set key=value` overrides on a RunConfig: `train.learning_rate=1e-3`, `model.sliding_window=64`."""

from __future__ import annotations

import dataclasses
import enum
import importlib
import pkgutil
import types
import typing

from v4jax.config import RopeScaling
from v4jax.training.config import RunConfig


def available_configs() -> list[str]:
    import configs

    return sorted(m.name for m in pkgutil.iter_modules(configs.__path__))


def load_config(name: str) -> RunConfig:
    if name not in available_configs():
        raise ValueError(f"unknown config {name!r}; known: {', '.join(available_configs())}")
    return importlib.import_module(f"configs.{name}").config()


def apply(run: RunConfig, assignments: list[str]) -> RunConfig:
    changes: dict[str, dict] = {"model": {}, "train": {}}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        part, _, field = key.partition(".")
        if not sep or part not in changes or not field:
            raise ValueError(f"--set {assignment!r}: expected model.<field>=<value> or train.<field>=<value>")
        target = getattr(run, part)
        fields = {f.name: f for f in dataclasses.fields(target)}
        if field not in fields:
            raise ValueError(f"--set {assignment!r}: {type(target).__name__} has no field {field!r}")
        changes[part][field] = _parse(text, typing.get_type_hints(type(target))[field], assignment)
    if changes["model"] and "pattern" in changes["model"] and "num_hidden_layers" not in changes["model"]:
        from v4jax.config import expand_pattern

        changes["model"]["num_hidden_layers"] = len(expand_pattern(changes["model"]["pattern"]))
    return RunConfig(model=run.model.replace(**changes["model"]),
                     train=dataclasses.replace(run.train, **changes["train"]))


def _parse(text: str, hint, assignment: str):
    options = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    if text.lower() == "none" and type(None) in typing.get_args(hint):
        return None
    for option in options:
        try:
            return _convert(text, option)
        except (TypeError, ValueError):
            continue
    raise ValueError(f"--set {assignment!r}: {text!r} is not a valid {_name(hint)}")


def _convert(text: str, kind):
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(text)
    if kind in (int, float, str):
        return kind(text)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return kind(text)
    if kind is RopeScaling:
        raise TypeError("rope_scaling cannot be set from the command line")
    raise TypeError(kind)


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _name(hint) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(hint)) if _is_union(hint) else \
        getattr(hint, "__name__", str(hint))
