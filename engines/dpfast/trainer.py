"""How the engine enters upstream's ``dp --pt train``: ``install(name)`` wraps upstream's
``Trainer.run`` so that, after upstream has built model, statistics, loss, learning-rate
schedule, optimizer settings and data, the training loop is the named engine's
(device-resident, CUDA-graph-captured; see ``graph`` and ``fused``). It also registers the
accuracy-gate hooks so the gate judges the engine's own code. Inputs outside the engine's
scope raise ``support.Unsupported`` naming what is unsupported.

A variant selects an engine with a two-line patch module: ``from dpfast import trainer;
trainer.install("fused")``. The engine is chosen by name (the wrapped run reads it from
``_dph_engine``), so what runs does not depend on the order modules were loaded in. What is
replaced -- ``Trainer.run``, the gate's two ``harness.child.runtime`` hooks, and through
``stats.install`` upstream's two neighbour-list builders -- goes through ``harness.core.rebind``,
which records it for the run record and puts it back in ``uninstall``.
"""
from __future__ import annotations

from typing import Callable

from harness.core import rebind

from . import fused, gate, graph, stats

ENGINES: dict[str, type] = {"graph": graph.GraphEngine, "fused": fused.FusedEngine}
BY = "dpfast.trainer"


def engine_class(name: str) -> type:
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown dpfast engine {name!r} (known: {', '.join(ENGINES)})") from None


# name -> (parity_forward, parity_train_step): what harness.child.runtime's gate hooks call
GATE_HOOKS: dict[str, tuple[Callable, Callable]] = gate.HOOKS


def install(name: str) -> None:
    """Make upstream's Trainer.run train with engine `name` and register its gate hooks. A
    variant's chain loads its patch modules root first, so a derived variant (fused, base graph)
    installs last and its engine is the one that trains."""
    cls = engine_class(name)
    from deepmd.pt.train import training

    if not getattr(training.Trainer.run, "_dph_engine", None):
        orig_run = training.Trainer.run

        def engine_run(self) -> None:
            if getattr(self, "num_steps", 0) <= getattr(self, "start_step", 0):
                return orig_run(self)
            eng = engine_run._dph_engine(self)
            self._graph_engine = eng
            try:
                eng.run()
            finally:
                self._close_lmdb_loaders()

        rebind.replace(training.Trainer, "run", engine_run, by=BY,
                       why="the training loop is a dpfast engine's (the record's engine block names it), "
                           "after upstream has built model, statistics, loss, schedule and data")
    training.Trainer.run._dph_engine = cls
    # upstream's input statistics and validation forward, which the engine keeps, build their
    # neighbour lists from all pairs: through cell lists they stay linear in the atoms
    stats.install()
    from harness.child import runtime

    fwd, step = GATE_HOOKS[name]
    why = "the accuracy gate judges the engine's own forward and step, not upstream's"
    rebind.replace(runtime, "parity_forward", fwd, by=BY, why=why)
    rebind.replace(runtime, "parity_train_step", step, by=BY, why=why)


def uninstall() -> None:
    """Put upstream's Trainer.run, the gate's hooks and the neighbour-list builders back (tests)."""
    rebind.restore(BY)
    stats.uninstall()
