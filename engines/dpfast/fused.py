"""Engine of the ``fused`` variant: graph's engine with an analytic force path.

``graph`` gets forces from ``torch.autograd.grad(E, R~, create_graph=True)`` and then
needs a second-order backward for the training loss. Here the first derivative
dE/dR~ is written out explicitly with ordinary differentiable tensor ops:

* embedding net G(s) per neighbour evaluated together with its forward-mode
  derivative dG/ds (input width is 1, so the tangent is one vector per neighbour);
  the value and tangent share one GEMM per layer (stacked along a leading dim);
* descriptor xyz = R~^T G / nnei, D = xyz^T xyz[:, :axis];
* fitting net forward storing tanh outputs, then its hand-written VJP with unit
  cotangent (idt time-step scaling, identity / concat resnet skips);
* dE/dR~ = G gxyz^T (+ (gG . dG/ds) on the s column) per type block (grouped: all blocks'
  contractions in one bmm each over sub-atoms of gcd(sel) neighbours, embed_contract_grouped);

so forces are an explicit first-order function of the parameters and the training
loss needs ONE ordinary autograd backward. That function (geometry in, energy /
force / virial out) is also what torch.compile (Inductor) fuses on CUDA.

This module holds ``FusedEngine``: its configuration (DPH_FUSED_* knobs), the prediction and
training step around the analytic path, their torch.compile (the energy/force function, or the
whole step) and its preparation (compile, CUDA-graph capture; a failure is a failed run, or with
DPH_ENGINE_ALLOW_FALLBACK=1 a recorded eager fallback: ran.py), plus the accuracy-gate hooks.
The math lives in ``analytic_energy`` (energy and dE/dR~) and ``analytic_nets`` (the MLPs and
their derivatives, per net and grouped).
"""
from __future__ import annotations

import logging

import torch

from harness.core import rebind

from . import analytic_nets, graph, ran
from .analytic_energy import AnalyticEnergy
from .device_data import ShapeGroup
from .support import refuse

log = logging.getLogger("deepmd.fused")


class FusedEngine(graph.GraphEngine, AnalyticEnergy):
    """GraphEngine with analytic first derivatives (one backward per training step)."""

    # compact: per pair one int32 s*nloc + j, per frame coordinates + image shifts; the step
    # re-forms r_j - r_i + shift (bitwise the on-the-fly diff) and R~ with its closed-form
    # Jacobian inside _predict_core, compiled with the rest: ~30x less geometry than graph's
    geom_default = "compact"
    engine_name = "fused"

    def __init__(self, trainer=None, device=None, opts=None, model=None) -> None:
        super().__init__(trainer, device, opts, model)
        self._init_fused()
        log.info("fused: %s embedding nets, %s fitting nets, %s contractions (DPH_FUSED_GROUPED=%s)",
                 "grouped" if self.grouped else "per-block",
                 "grouped" if self.grouped and self.grouped_fit else "per-type",
                 "grouped" if self.grouped and self.grouped_contract else "per-block",
                 self.opts.grouped)

    def _init_fused(self) -> None:
        nets = self.sea.filter_layers.networks
        self.emb_layers = [analytic_nets.mlp_layers(n) for n in nets]
        self.fit_layers = [analytic_nets.mlp_layers(n) for n in self.fit.filter_layers.networks]
        for ls in self.fit_layers:
            if ls[-1].matrix.shape[1] != 1:
                refuse("fitting net output width != 1", "fused")
        self.autograd_forces = self.opts.autograd_forces
        if self.ran is not None:  # a training engine (the gate's has none)
            self.ran.forces = "autograd" if self.autograd_forces else "analytic"
        self._compiled = None
        # compiled whole step (fused's manifest env; off in fused-predict): gather + energy/forces + upstream's loss
        # in ONE torch.compile'd function (see compiled_step_wanted / _step_core)
        self.compile_step = self.opts.compile_step
        self._step_compiled = None
        self.batched = self.opts.batched  # measured slower on water (padding)
        self.kernels = self.opts.kernels  # embedding nets + contractions by the Triton kernels
        if self.kernels:
            self._check_kernels()
        # grouped (default "1"): with several descriptor blocks (fitting types), all their
        # embedding (fitting) nets in one chain of batched GEMMs over row chunks, and the
        # contractions R~^T G, G gxyz^T, R~ gxyz of all blocks in one bmm each over sub-atoms
        # (embed_contract_grouped, env_grad_grouped, fit_grouped); "nets": nets grouped,
        # contractions per block (embed_grouped_with_tangent); "emb": embedding nets grouped,
        # fitting nets per type, contractions per block; "0": one GEMM chain per block (variant
        # fused-blocks). The intermediate modes are there to measure each grouping apart.
        mode = self.opts.grouped  # validated: 0 | 1 | nets | emb
        self.grouped = mode != "0"
        self.grouped_fit = mode in ("1", "nets")
        self.grouped_contract = mode == "1"

    def _check_kernels(self) -> None:
        """fused-kernels trains only what the kernels evaluate; a CPU run needs Triton's interpreter."""
        from . import embed_kernels

        if not embed_kernels.available():
            refuse("the Triton kernels (Triton is not installed)", "fused-kernels")
        if self.device.type != "cuda" and not embed_kernels.interpreted():
            refuse(f"the Triton kernels on {self.device.type} (they need CUDA, or TRITON_INTERPRET=1 on a CPU)",
                   "fused-kernels")
        for k, layers in enumerate(self.emb_layers):
            why = embed_kernels.unsupported(layers)
            if why:
                refuse(f"embedding net {k}: {why}", "fused-kernels")
        if getattr(self, "ran", None) is not None:
            self.ran.kernels = "triton"

    # ------------------------------------------------------------ analytic path
    def _predict_core(self, rt, jac, jidx, diff, tcount, bias, virial=True):
        """Energy, forces, virial (if virial and diff given). rt None (on-the-fly mode): R~ and
        the factors of its closed-form Jacobian are computed here from diff, so that Inductor
        fuses them with the embedding input and the force contraction (no Jacobian tensor)."""
        # compact mode: diff formed here (fused with its gathers); on the fly: R~ too
        rt, factors, jidx, diff = self.env_for_step(rt, jidx, diff, tcount)
        ae, g = (self.energy_and_grad_batched if self.batched else self.energy_and_grad)(rt, tcount, bias)
        energy = ae.to(self.gprec).sum(dim=1, keepdim=True)
        return self.forces_from_env_grad(energy, g, jac, factors, jidx, diff, virial)

    def predict(self, rt, jac, jidx, diff, tcount, bias, create_graph, virial=None):
        if self.autograd_forces:
            return super().predict(rt, jac, jidx, diff, tcount, bias, create_graph, virial)
        virial = self.want_virial(diff, virial)
        if self._compiled is not None:
            return self._compiled(rt, jac, jidx, diff, tuple(tcount), bias, virial)
        return self._predict_core(rt, jac, jidx, diff, tcount, bias, virial)

    # ------------------------------------------------------- compiled whole step
    def compiled_step_wanted(self) -> bool:
        """opts.compile_step (and compile: off means eager throughout) on CUDA; on CPU only with
        opts.compile_cpu as well (tests and CPU checks: Inductor's C++ compile of the whole step
        takes minutes on 2 cores)."""
        return (self.compile_step and self.opts.compile and not self.autograd_forces
                and self.opts.compiles_on(self.device.type))

    def _step_core(self, S: dict, idx: torch.Tensor, lr: torch.Tensor):
        """gather -> energy/forces/virial (_predict_core) -> upstream's loss (loss_and_more, same
        arguments as the eager step), for the frames idx of the step view S (_step_view). Compiled
        as one function by enable_step_compile, so Inductor fuses the index_selects into their
        consumers and the loss's forward and (AOTAutograd) backward into the energy/force kernels."""
        rt, jac, jidx, diff, labels = self.gather(S["geom"], S["labels"], idx)
        virial = self.want_virial(diff, None)
        pred = self._predict_core(rt, jac, jidx, diff, S["tcount"], S["bias"], virial)
        return self.loss_and_more(pred, labels, lr, **S["loss"])

    @staticmethod
    def _step_view(G: ShapeGroup) -> dict:
        """What _step_core reads of a group: the stored geometry/labels, the loss's static inputs.
        A small dict of its own (cached in G), so dynamo's guards do not see the CUDA graphs and
        outputs that capture later stores in G."""
        if G.step_view is None:
            loss = dict(G.loss_inputs(), finds=dict(G.finds))
            G.step_view = {"geom": dict(G.geom), "labels": G.labels, "tcount": G.tcount, "bias": G.bias, "loss": loss}
        return G.step_view

    def enable_step_compile(self) -> None:
        backend = self.opts.compile_backend
        self._step_compiled = _torch_compile(self._step_core, backend, self.opts.compile_mode)
        log.info("fused: compiled whole step enabled (gather + energy/forces + loss in one torch.compile, "
                 "backend=%s, device %s)", backend, self.device.type)

    def _lr_tensor(self, lr) -> torch.Tensor:
        """The step's learning rate as a float64 device tensor (the CUDA loop's lr_t already is one;
        a float would make dynamo specialise on its value: one recompile per step)."""
        if torch.is_tensor(lr):
            return lr
        t = self.__dict__.get("_lr_host")
        if t is None or t.device != self.device:
            t = self._lr_host = torch.zeros((), dtype=torch.float64, device=self.device)
        t.fill_(float(lr))
        return t

    def forward_backward(self, G: ShapeGroup, lr, idx: torch.Tensor | None = None):
        if not self.compiled_step_wanted():
            return super().forward_backward(G, lr, idx)
        if self._step_compiled is None:
            self.enable_step_compile()
        if idx is None:
            idx = self.sample(G)  # device RNG stays eager (Philox offsets under capture)
        loss, more = self._step_compiled(self._step_view(G), idx, self._lr_tensor(lr))
        self.flat.grads_from_loss(loss)
        return loss, more

    def enable_compile(self) -> None:
        self._compiled = _torch_compile(self._predict_core, "inductor", self.opts.compile_mode)
        log.info("fused: torch.compile enabled (mode=%s)", self.opts.compile_mode)

    # --------------------------------------------------------------- prepare
    def compile_wanted(self) -> bool:
        """On CUDA: the compiled step (or energy/force function) unless opts.compile is off; on
        CPU only the compiled whole step, with opts.compile_cpu (compiled_step_wanted)."""
        if self.autograd_forces:
            return False
        if self.cuda:
            return self.opts.compile
        return self.compiled_step_wanted()

    def prepare(self) -> None:
        """Compile the step and (CUDA) capture it in graph's CUDA graphs. A failure before the
        compiled code ran is a failed run (ran.CaptureFailed, naming the cause), or with the
        manifest's DPH_ENGINE_ALLOW_FALLBACK=1 the eager analytic path, recorded as a fallback."""
        if not self.compile_wanted():
            return super().prepare()
        r = self.ran
        step = self.compiled_step_wanted()
        try:
            if step:
                self.enable_step_compile()  # the whole step; predict is traced inside it
            else:
                self.enable_compile()
            r.compiled, r.compile_backend = ("step", self.opts.compile_backend) if step else ("predict", "inductor")
            if self.cuda:
                self.capture()
            else:
                self._warm_compiled()
        except Exception as e:  # noqa: BLE001 (any compile or capture error: failed run or fallback)
            if getattr(self, "_capture_started", False):
                # the compiled code ran (warm-up passed): a failed capture is not Inductor's,
                # and a second capture after an invalidated one cannot work (RNG offsets)
                raise
            why = f"{type(e).__name__}: {str(e)[:500]}"
            if not self.opts.allow_fallback:
                raise ran.CaptureFailed(f"fused: the compiled step could not be prepared ({why}); no fallback "
                                        f"(a manifest allows one with DPH_ENGINE_ALLOW_FALLBACK=1)") from e
            log.warning("fused: compiled step failed (%s); falling back to the eager analytic path (allowed by "
                        "the manifest; the run is recorded as a fallback)", why)
            self._to_eager()
            r.compiled, r.compile_backend, r.fallback, r.fallback_reason = "none", None, "eager", why
            if self.cuda:
                self.capture()
        self._note_prepared()

    def _to_eager(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self._compiled = None
        self._step_compiled = None
        self.compile_step = False
        if getattr(self.opt, "compiled", None) is not None:
            self.opt.compiled = None  # the compiled flat Adam goes as well (eager FlatAdam)
        self.opt.zero_grad(set_to_none=True)

    def _warm_compiled(self) -> None:
        """CPU (DPH_COMPILE_CPU=1): compile the step now, as capture's warm-up does on CUDA, so a
        compile error is met here and not at step 1; parameters, optimizer and RNG are put back."""
        snap = self.opt.snapshot()
        rng = torch.random.get_rng_state()
        for G in self.groups:
            idx = torch.zeros(G.bsz, dtype=torch.long, device=self.device)
            self.forward_backward(G, self.lr_values[self.tr.start_step], idx)
        torch.random.set_rng_state(rng)
        self.opt.restore(snap)
        self.opt.zero_grad(set_to_none=True)


def _torch_compile(fn, backend: str, mode: str):
    """torch.compile of one of the engine's step functions: static shapes, graph breaks allowed
    (counted into the record), Inductor's `mode` (opts.compile_mode); room in dynamo's cache for
    every group's shapes (a process-wide setting: through rebind, so the record lists it)."""
    import torch._dynamo

    limit = max(64, torch._dynamo.config.cache_size_limit)
    if limit != torch._dynamo.config.cache_size_limit:
        rebind.replace(torch._dynamo.config, "cache_size_limit", limit, by="dpfast.fused",
                       why="one compiled step per shape group (Al-Cu-Mg has three) without evictions")
    kw = {"mode": mode} if mode != "default" and backend == "inductor" else {}
    return torch.compile(fn, dynamic=False, fullgraph=False, backend=backend, **kw)
