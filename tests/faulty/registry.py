"""Registration of faulty targets: which rule each breaks, and how it misbehaves."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from blkif_spec import catalogue

T = TypeVar("T")


@dataclass(frozen=True)
class Fault:
    name: str  # the attribute name in its module: the target spec is MODULE:NAME
    module: str
    role: str  # "backend" or "frontend"
    rule: str  # the rule it breaks (a catalogue ID)
    what: str  # one line: how it misbehaves
    hangs: bool = False  # expected verdict is timeout rather than fail

    @property
    def target(self) -> str:
        return f"{self.module}:{self.name}"


FAULTS: dict[str, Fault] = {}


def faulty(role: str, rule: str, what: str, *, hangs: bool = False) -> Callable[[T], T]:
    """Register the decorated target class (or factory) as a fault breaking `rule`."""
    catalogue.get(rule)
    if role not in ("backend", "frontend"):
        raise ValueError(f"role {role!r}: backend or frontend")

    def register(obj: T) -> T:
        name = obj.__name__  # type: ignore[attr-defined]
        module = obj.__module__
        if name in FAULTS:
            raise ValueError(f"fault {name} registered twice")
        FAULTS[name] = Fault(name, module, role, rule, what, hangs)
        return obj

    return register


def serving(server: type) -> type:
    """The reference `Backend` serving its rings with `server` (a `RingServer` variant)."""
    from blkif_spec.drivers.backend import Backend

    return type(f"{server.__name__.lstrip('_')}Backend", (Backend,), {"server_class": server})


def all_faults() -> list[Fault]:
    """Every registered fault, importing the catalogue modules."""
    for module in ("tests.faulty.backends", "tests.faulty.frontends", "tests.faulty.backends_xenbus"):
        importlib.import_module(module)  # importing a catalogue module registers its faults

    return sorted(FAULTS.values(), key=lambda f: (f.role, f.rule, f.name))
