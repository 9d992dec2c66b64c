"""What the engine really ran, for the run record: a benchmark must time the path it reports.

``Ran`` is filled while the engine prepares its step (compile, CUDA-graph capture) and trains;
``publish`` hands it to the training child's runtime, whose launcher writes it into steps.json
at exit (``engine``), and the harness copies it into the run record. A fast path that could not
be prepared is a failed run (``CaptureFailed``), unless the variant's manifest allows a fallback
(``options.EngineOptions.allow_fallback``, DPH_ENGINE_ALLOW_FALLBACK=1): then the run trains on the eager path, ``fallback`` says so, and
the harness records the run as ``fallback``, never as that variant's speed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


class CaptureFailed(RuntimeError):
    """The engine's compiled or captured step could not be prepared and no fallback is allowed."""


@dataclass
class Ran:
    engine: str  # graph | fused
    device: str  # cpu | cuda
    forces: str  # analytic (fused) | autograd
    kernels: str | None = None  # triton: fused's embedding nets and contractions by its Triton kernels
    order: str = "engine"  # whose draw of the step's frames: engine (device RNG) | upstream (its sampler)
    compiled: str = "none"  # step (gather + forces + loss) | predict (energy/forces) | none
    compile_backend: str | None = None
    optimizer: str = "eager"  # the flat Adam: compiled | eager
    cuda_graphs: int = 0  # graphs captured and replayed (0: every step launched eagerly)
    graph_breaks: int | None = None  # dynamo's count over the process (None: nothing compiled)
    fallback: str | None = None  # eager: the prepared path failed and the manifest allowed a fallback
    fallback_reason: str | None = None
    options: dict | None = None  # the EngineOptions the engine ran with (options.py)

    def as_dict(self) -> dict:
        d = asdict(self)
        if self.compiled != "none":
            d["graph_breaks"], d["graph_break_reasons"] = graph_breaks()
        return d


def graph_breaks(keep: int = 8) -> tuple[int, dict[str, int]]:
    """Graph breaks dynamo took in this process (fullgraph=False lets a break pass silently): the
    count, and the `keep` most frequent reasons (each cut to 300 characters) with their counts."""
    from torch._dynamo.utils import counters

    c = counters["graph_break"]
    top = sorted(c.items(), key=lambda kv: -kv[1])[:keep]
    return int(sum(c.values())), {str(k)[:300]: int(v) for k, v in top}


def publish(ran: Ran) -> None:
    """Let the training child's launcher write `ran` into steps.json at exit (read then, so graph
    breaks of later recompiles count). Outside the harness (tests drive engines directly): nothing."""
    try:
        from harness.child import runtime
    except ImportError:
        return
    runtime.engine_report = ran.as_dict
