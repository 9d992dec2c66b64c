"""The one place a training child replaces upstream's code (issue 37).

Every function, method or setting of upstream (or of the harness's child runtime) that a
variant, the step clock or the kill/resume support swaps out goes through ``replace``: it puts the
replacement in place, remembers what was there and why, and ``restore`` puts the originals back
(newest first, so stacked replacements of one target unwind in order). ``replaced()`` is what the
run record's ``upstream_replaced`` lists -- a run says which of upstream's code did not run as
upstream wrote it. ``original(owner, name)`` is the code as it was before the first replacement
(what a replacement calls to fall back to upstream's own).

Standard library only: importable beside any upstream tree, in every backend's child.
"""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Any, Iterator

_MISSING = object()


@dataclass(frozen=True, eq=False)  # identity: `original` may be anything
class Replacement:
    owner: Any  # a module, a class or an object
    name: str
    original: Any  # what owner.__dict__ held (_MISSING: inherited or absent)
    replacement: Any
    by: str  # the installer (its module), what `restore(by)` puts back
    why: str

    @property
    def target(self) -> str:
        o = self.owner
        if isinstance(o, type):
            return f"{o.__module__}.{o.__qualname__}.{self.name}"
        return f"{getattr(o, '__name__', type(o).__name__)}.{self.name}"

    def as_dict(self) -> dict[str, str]:
        return {"target": self.target, "by": self.by, "why": self.why}


_active: list[Replacement] = []


def _own(owner: Any, name: str) -> Any:
    """What the owner holds under `name`: a class's own __dict__ entry as stored (not a bound
    method, not an inherited one); an instance's own attribute (not its class's method); a
    module's attribute (config modules keep theirs outside __dict__). _MISSING when there is none."""
    if isinstance(owner, type):
        return owner.__dict__.get(name, _MISSING)
    if not isinstance(owner, types.ModuleType) and hasattr(owner, "__dict__"):
        return vars(owner).get(name, _MISSING)  # an instance: its own attribute, not its class's method
    return getattr(owner, name, _MISSING)


def replace(owner: Any, name: str, new: Any, *, by: str, why: str) -> Any:
    """Put `new` at owner.name and remember what was there; idempotent for the same `new`.
    Returns upstream's original (as `original` does)."""
    if _own(owner, name) is new:
        return original(owner, name)
    _active.append(Replacement(owner, name, _own(owner, name), new, by, why))
    setattr(owner, name, new)
    return original(owner, name)


def original(owner: Any, name: str) -> Any:
    """owner.name as it was before the first replacement still in place (the current one if none)."""
    for r in _active:
        if r.owner is owner and r.name == name:
            return _inherited(owner, name) if r.original is _MISSING else r.original
    return _own(owner, name) if isinstance(owner, type) and name in owner.__dict__ else getattr(owner, name)


def _inherited(owner: Any, name: str) -> Any:
    """What a class would have under `name` without its own entry (a base's, as stored); for an
    instance, its class's attribute as the instance sees it (a method bound to it)."""
    if not isinstance(owner, type):
        return getattr(type(owner), name).__get__(owner, type(owner))
    for k in getattr(owner, "__mro__", ())[1:]:
        if name in k.__dict__:
            return k.__dict__[name]
    raise AttributeError(f"{owner!r} had no {name!r} before it was replaced")


def restore(by: str | None = None) -> None:
    """Put back what `by`'s replacements replaced (every installer's when None), newest first."""
    for r in reversed(list(_active)):
        if by is None or r.by == by:
            _unwind(r)


def _unwind(r: Replacement) -> None:
    i = next(k for k, x in enumerate(_active) if x is r)
    if _own(r.owner, r.name) is r.replacement:  # the newest on its target: put the original back
        if r.original is _MISSING:
            delattr(r.owner, r.name)
        else:
            setattr(r.owner, r.name, r.original)
    else:  # another replacement stacked on it: that one now restores to this one's original
        for j in range(i + 1, len(_active)):
            later = _active[j]
            if later.owner is r.owner and later.name == r.name and later.original is r.replacement:
                _active[j] = Replacement(later.owner, later.name, r.original, later.replacement, later.by, later.why)
                break
    del _active[i]


def replaced() -> list[dict[str, str]]:
    """What is replaced now, oldest first: target, installer, reason (the run record's list)."""
    return [r.as_dict() for r in _active]


def is_replaced(owner: Any, name: str) -> bool:
    return any(r.owner is owner and r.name == name for r in _active)


@contextlib.contextmanager
def scope() -> Iterator[None]:
    """Inside the block replace and restore freely; when it ends, what is replaced is what was
    replaced when it began (tests: what a test installs goes, what it uninstalled of a wider
    fixture's comes back)."""
    before = list(_active)
    try:
        yield
    finally:
        for r in reversed(list(_active)):
            if not any(r is b for b in before):
                _unwind(r)
        gone = {(id(r.owner), r.name) for r in before if not any(r is a for a in _active)}
        for r in before:  # oldest first: the newest replacement of a target is the one left in place
            if (id(r.owner), r.name) in gone:
                setattr(r.owner, r.name, r.replacement)
        _active[:] = before
