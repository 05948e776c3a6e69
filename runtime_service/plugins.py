"""Loading plugins by name (agents and tools): the built-ins, then an entry-point group of
installed packages, then `name=package.module:attr` specs from the operator, later ones
overriding earlier. Clients only ever name a plugin; they can never make the runtime import
arbitrary code. Every failure is raised at start-up as the caller's own error type."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import entry_points
from typing import Any, TypeVar

T = TypeVar("T")


def import_plugin(
    spec: str, what: str, instantiate: Callable[[Any, str], T], error: type[Exception]
) -> T:
    """Load `package.module:attr` (a class, which `instantiate` makes an instance of, or an
    object); `what` names the kind of plugin in messages ("agent", "tool")."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise error(f"{what} spec {spec!r} must look like package.module:attr")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise error(f"cannot load {what} {spec!r}: {exc}") from exc
    return instantiate(obj, spec)


def load_plugins(
    builtins: Mapping[str, T],
    group: str,
    specs: Iterable[str],
    what: str,
    instantiate: Callable[[Any, str], T],
    error: type[Exception],
    use_entry_points: bool = True,
) -> dict[str, T]:
    """The plugins by name: `builtins`, then the entry points of `group`, then `specs`."""
    plugins = dict(builtins)
    if use_entry_points:
        for ep in entry_points(group=group):
            try:
                plugins[ep.name] = instantiate(ep.load(), f"entry point {ep.name}={ep.value}")
            except Exception as exc:
                raise error(f"cannot load entry point {ep.name}={ep.value}: {exc}") from exc
    for spec in specs:
        name, sep, target = spec.partition("=")
        if not sep or not name.strip():
            raise error(f"{what} option {spec!r} must look like name=package.module:attr")
        plugins[name.strip()] = import_plugin(target.strip(), what, instantiate, error)
    return plugins
