"""harness.core.rebind, the one place a training child replaces upstream's code: what it
replaced is listed and put back exactly, also when replacements stack or are undone out of order."""
from __future__ import annotations

import types

from harness.core import rebind


class Base:
    def f(self):
        return "base"


class Child(Base):
    def g(self):
        return "child"


def test_a_replaced_method_is_listed_and_put_back_exactly():
    with rebind.scope():
        orig_g = Child.__dict__["g"]
        assert rebind.replace(Child, "g", lambda self: "new", by="t", why="because") is orig_g
        assert Child().g() == "new" and rebind.original(Child, "g") is orig_g
        assert rebind.replaced()[-1] == {"target": f"{__name__}.Child.g", "by": "t", "why": "because"}
        rebind.restore("t")
        assert Child.__dict__["g"] is orig_g and not rebind.is_replaced(Child, "g")


def test_an_inherited_method_is_removed_again_not_copied_down():
    with rebind.scope():
        rebind.replace(Child, "f", lambda self: "new " + rebind.original(Child, "f")(self), by="t", why="w")
        assert Child().f() == "new base"  # the original is the base's, called through original()
    assert "f" not in Child.__dict__ and Child().f() == "base"


def test_an_instance_attribute_is_the_instances_own_and_goes_again():
    """The profiler wraps one module instance's forward (not its class's): the original is the
    class's method bound to that instance, and restore leaves the instance without an attribute
    of its own, as it was; an attribute the instance had is put back."""
    c, other = Child(), Child()
    with rebind.scope():
        orig = rebind.replace(c, "g", lambda: "wrapped " + rebind.original(c, "g")(), by="t", why="w")
        assert orig() == "child" and c.g() == "wrapped child" and other.g() == "child"
        assert rebind.replaced()[-1]["target"] == "Child.g"
        rebind.restore("t")
        assert "g" not in vars(c) and c.g() == "child"
        c.g = own = lambda: "own"
        rebind.replace(c, "g", lambda: "x", by="t", why="w")
    assert vars(c)["g"] is own


def test_stacked_replacements_unwind_in_any_order():
    mod = types.ModuleType("m")
    mod.h = orig = lambda: 0
    with rebind.scope():
        a, b = (lambda: 1), (lambda: 2)
        rebind.replace(mod, "h", a, by="A", why="w")
        rebind.replace(mod, "h", b, by="B", why="w")
        assert mod.h is b and rebind.original(mod, "h") is orig
        rebind.restore("A")  # the older one first: the newer stays, and will restore upstream's
        assert mod.h is b and [r["by"] for r in rebind.replaced() if r["target"] == "m.h"] == ["B"]
        rebind.restore("B")
        assert mod.h is orig


def test_replace_is_idempotent_and_scope_restores_only_its_own():
    mod = types.ModuleType("m2")
    mod.x = 1
    outer = lambda: None  # noqa: E731
    mod.y = None
    rebind.replace(mod, "y", outer, by="outer", why="w")
    try:
        with rebind.scope():
            rebind.replace(mod, "x", 2, by="inner", why="w")
            rebind.replace(mod, "x", 2, by="inner", why="w")
            assert [r["by"] for r in rebind.replaced() if r["target"].startswith("m2.")] == ["outer", "inner"]
        assert mod.x == 1 and mod.y is outer  # the block's own put back, the outer one kept
    finally:
        rebind.restore("outer")
    assert mod.y is None


def test_a_scope_ends_with_what_was_replaced_when_it_began():
    """A test that uninstalls a wider fixture's replacement (to compare with upstream's code) and
    installs it again gets the fixture's state back at its end, not upstream's."""
    mod = types.ModuleType("m3")
    mod.f = orig = lambda: "upstream"
    fixture = lambda: "fixture"  # noqa: E731
    rebind.replace(mod, "f", fixture, by="fix", why="w")
    try:
        with rebind.scope():
            rebind.restore("fix")
            assert mod.f is orig
            rebind.replace(mod, "f", lambda: "again", by="fix", why="w")
        assert mod.f is fixture and [r["by"] for r in rebind.replaced() if r["target"] == "m3.f"] == ["fix"]
    finally:
        rebind.restore("fix")
    assert mod.f is orig
