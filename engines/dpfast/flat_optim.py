"""Flat parameter / gradient / Adam-state buffers for the ``graph`` and ``fused`` engines.

Every trainable parameter becomes a view into one contiguous buffer per (device, dtype)
bucket (one bucket in our variants: all parameters share one precision; a mixed model gets
one bucket per dtype, never a silent cast). ``.grad`` of each parameter is a view into the
bucket's flat gradient, so the engine writes all gradients with ONE multi-tensor copy (from
``torch.autograd.grad``), a data-parallel run all-reduces ONE tensor per bucket, and Adam /
AdamW is a handful of whole-buffer ops instead of ~44 per-parameter tensors in
multi_tensor_apply chunks plus ~130 tiny per-tensor scalar kernels.

``FlatAdam.step`` follows ``torch.optim.Adam``'s single-tensor *capturable* path op for op
(step += 1; weight decay: AdamW ``p *= 1 - lr*wd``, Adam ``g = g + wd*p``; ``m.lerp_(g, 1-b1)``;
``v.mul_(b2).addcmul_(g, g, value=1-b2)``; bias corrections from the device step tensor;
``denom = (v.sqrt() / (bc2_sqrt * -step_size)).add_(eps / -step_size)``; ``p.addcdiv_(m, denom)``),
with the learning rate as a float64 tensor (or a float), so it can be captured in a CUDA graph.

Upstream keeps seeing a normal optimizer: the trainer's own ``torch.optim.Adam/AdamW`` (over the
original parameter list) stays ``trainer.optimizer``; ``sync_to_torch`` points its per-parameter
state at views of the flat moments (and writes the step count) before upstream's
``Trainer.save_model``, and ``load_from_torch`` takes a restart's loaded state into the buffers.

Unlike torch's optimizer, every parameter in the buffers is updated every step: a parameter that
gets no gradient in a step (e.g. the net of an atom type absent from a shape group, where the
engine skips the block) is updated with a zero gradient. That is what upstream does (its
descriptor and fitting run every net on masked atoms, so such gradients are zeros, not None).
Parameters with no elements (se_e2_a's ``compress_*`` placeholders, never in the graph upstream)
and frozen ones are left out, as torch's optimizer leaves them out.
"""
from __future__ import annotations

import logging

import torch

from . import options
from .options import EngineOptions

log = logging.getLogger("deepmd.graph")

# every parameter starts on a 256-byte boundary of its buffer (as a caching-allocator block would):
# Inductor copies misaligned inputs (extra kernels) and GEMMs prefer aligned operands. The gaps
# are zeros in parameters, gradients and moments alike, and Adam keeps zeros zero.
ALIGN_BYTES = 256


def adam_bucket_update(p, g, m, v, lr, step, *, b1: float, b2: float, eps: float, wd: float,
                       decoupled: bool) -> None:
    """One bucket's Adam/AdamW update, in place, in torch's capturable single-tensor op order
    (`step` already incremented). The body FlatAdam.step runs per bucket, eager or compiled (then
    Inductor fuses it into one elementwise kernel over the bucket; the scalar bias corrections
    are recomputed in it or in a tiny kernel of their own)."""
    bias_correction1 = 1 - b1**step
    bias_correction2 = 1 - b2**step
    step_size_neg = (lr / bias_correction1).neg()
    bias_correction2_sqrt = bias_correction2.sqrt()
    dscale = bias_correction2_sqrt * step_size_neg
    deps = eps / step_size_neg
    if wd != 0:
        if decoupled:
            p.mul_(1 - lr * wd)
        else:
            g = g.add(p, alpha=wd)
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v.sqrt() / dscale).add_(deps)
    p.addcdiv_(m, denom)


def trainable(params) -> list[torch.Tensor]:
    return [p for p in params if p.requires_grad and p.numel() > 0]


class FlatParams:
    """Re-seat ``params`` as views of one flat buffer per (device, dtype); ``.grad`` likewise."""

    def __init__(self, params) -> None:
        self.params = trainable(params)
        if not self.params:
            raise RuntimeError("graph variant: no trainable parameters")
        keys: dict[tuple, list[int]] = {}
        for i, p in enumerate(self.params):
            keys.setdefault((p.device, p.dtype), []).append(i)
        if len(keys) > 1:
            log.info("graph: parameters of %d (device, dtype) kinds: one flat bucket each %s",
                     len(keys), [str(k[1]) for k in keys])
        self.buckets: list[dict] = []
        with torch.no_grad():
            for (dev, dt), idx in keys.items():
                ps = [self.params[i] for i in idx]
                unit = max(1, ALIGN_BYTES // ps[0].element_size())
                views, off = [], 0
                for p in ps:
                    start = -(-off // unit) * unit  # gaps stay zero in the flat gradient
                    views.append((start, p.numel(), tuple(p.shape)))
                    off = start + p.numel()
                flat = torch.zeros(off, dtype=dt, device=dev)
                grad = torch.zeros(off, dtype=dt, device=dev)
                for p, (o, k, _) in zip(ps, views):
                    flat[o : o + k].copy_(p.detach().reshape(-1))
                gviews = []
                for p, (o, k, shp) in zip(ps, views):
                    p.data = flat[o : o + k].view(shp)
                    gv = grad[o : o + k].view(shp)
                    p.grad = gv
                    gviews.append(gv)
                self.buckets.append({"params": ps, "index": idx, "flat": flat, "grad": grad, "slices": views,
                                     "grad_views": gviews})

    # ------------------------------------------------------------------ grads
    def zero_grad(self) -> None:
        for b in self.buckets:
            b["grad"].zero_()

    def reseat_grads(self) -> None:
        """Point every ``.grad`` back at the flat gradient (something set it to None or replaced it)."""
        for b in self.buckets:
            for p, gv in zip(b["params"], b["grad_views"]):
                if p.grad is not gv:
                    p.grad = gv

    def grads_from_loss(self, loss: torch.Tensor) -> None:
        """d loss / d params into the flat gradient: one autograd call, then one multi-tensor copy
        per bucket into the gradient views (the alignment gaps stay zero). On H200 a torch.cat of
        the ~90 pieces (gaps included) into the flat gradient took 74 us per water step."""
        gs = torch.autograd.grad(loss, self.params, allow_unused=True, materialize_grads=True)
        for b in self.buckets:
            torch._foreach_copy_(b["grad_views"], [gs[i] for i in b["index"]])

    def all_reduce_grads(self, group=None) -> None:
        """SUM of the flat gradients over the ranks (one collective per bucket); the caller
        divides by the world size (``divide_grads``), as DDP averages."""
        import torch.distributed as dist

        for b in self.buckets:
            dist.all_reduce(b["grad"], op=dist.ReduceOp.SUM, group=group)

    def divide_grads(self, n: int) -> None:
        for b in self.buckets:
            b["grad"].div_(n)

    def checksum(self) -> str:
        """sha256 of the parameter bytes (all buckets): identical ranks print identical sums."""
        import hashlib

        h = hashlib.sha256()
        for b in self.buckets:
            h.update(b["flat"].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]


class FlatAdam:
    """Adam / AdamW on a FlatParams' buffers (see the module docstring for the op order).

    Quacks enough like a torch optimizer for the engine and its tests: ``param_groups[0]["lr"]``
    (float or float64 device tensor), ``zero_grad``, ``step``."""

    def __init__(self, flat: FlatParams, *, decoupled: bool, lr, betas, eps: float, weight_decay: float,
                 step_device: torch.device | None = None, compile: bool | None = None,
                 opts: EngineOptions | None = None) -> None:
        self.flat = flat
        self.decoupled = bool(decoupled)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.param_groups = [{"lr": lr, "params": flat.params}]
        dev = step_device if step_device is not None else flat.buckets[0]["flat"].device
        # float64 step on the params' device (torch: float32/float64 per default dtype; the
        # counts are exact integers either way, and beta**step is then computed in float64)
        self.step_t = torch.zeros((), dtype=torch.float64, device=dev)
        self.state = [
            {"exp_avg": torch.zeros_like(b["flat"]), "exp_avg_sq": torch.zeros_like(b["flat"])}
            for b in flat.buckets
        ]
        # opts.flat_adam_compile (CUDA; CPU with compile_cpu): the per-bucket update compiled into
        # one elementwise kernel per bucket (compile=True/False overrides the options)
        opts = options.current() if opts is None else opts
        if compile is None:
            compile = opts.flat_adam_compile and opts.compiles_on(dev.type)
        self.compiled = None
        if compile:
            import functools

            fn = functools.partial(adam_bucket_update, b1=self.betas[0], b2=self.betas[1], eps=self.eps,
                                   wd=self.weight_decay, decoupled=self.decoupled)
            self.compiled = torch.compile(fn, dynamic=False, fullgraph=True, backend=opts.compile_backend)
            log.info("graph: flat %s step compiled (backend %s)", "AdamW" if decoupled else "Adam", opts.compile_backend)

    def zero_grad(self, set_to_none: bool = False) -> None:  # noqa: ARG002 (the flat grad stays)
        self.flat.zero_grad()
        self.flat.reseat_grads()

    @torch.no_grad()
    def step(self) -> None:
        lr = self.param_groups[0]["lr"]
        if not torch.is_tensor(lr):
            lr = torch.tensor(float(lr), dtype=torch.float64, device=self.step_t.device)
        self.step_t.add_(1)
        for b, st in zip(self.flat.buckets, self.state):
            args = (b["flat"], b["grad"], st["exp_avg"], st["exp_avg_sq"], lr, self.step_t)
            if self.compiled is not None:
                self.compiled(*args)
            else:
                adam_bucket_update(*args, b1=self.betas[0], b2=self.betas[1], eps=self.eps,
                                   wd=self.weight_decay, decoupled=self.decoupled)

    # -------------------------------------------------------------- snapshots
    def snapshot(self):
        return ([b["flat"].detach().clone() for b in self.flat.buckets],
                [{k: t.clone() for k, t in st.items()} for st in self.state], self.step_t.clone())

    @torch.no_grad()
    def restore(self, snap) -> None:
        flats, states, step = snap
        for b, f in zip(self.flat.buckets, flats):
            b["flat"].copy_(f)
        for st, s0 in zip(self.state, states):
            for k in st:
                st[k].copy_(s0[k])
        self.step_t.copy_(step)

    # ---------------------------------------------------- upstream's optimizer
    def _views(self):
        for b, st in zip(self.flat.buckets, self.state):
            for p, (o, k, shp) in zip(b["params"], b["slices"]):
                yield p, st["exp_avg"][o : o + k].view(shp), st["exp_avg_sq"][o : o + k].view(shp)

    @torch.no_grad()
    def load_from_torch(self, opt: torch.optim.Optimizer) -> bool:
        """Take a torch Adam's per-parameter state (a restart's loaded checkpoint) into the buffers."""
        steps = []
        n = 0
        for p, m, v in self._views():
            st = opt.state.get(p)
            if not st:
                continue
            m.copy_(st["exp_avg"])
            v.copy_(st["exp_avg_sq"])
            steps.append(float(st["step"]))
            n += 1
        if not steps:
            return False
        if n != len(self.flat.params) or len(set(steps)) > 1:
            log.warning("graph: restart optimizer state covers %d/%d parameters with steps %s; the flat "
                        "optimizer keeps ONE step count for all (using the largest)",
                        n, len(self.flat.params), sorted(set(steps)))
        self.step_t.fill_(max(steps))
        return True

    def sync_to_torch(self, opt: torch.optim.Optimizer, lr: float | None = None) -> None:
        """Make ``opt`` (upstream's optimizer, same parameters) describe the flat state: its
        exp_avg / exp_avg_sq ARE views of the flat moments; ``step`` is a fresh tensor per
        parameter (torch increments each one, so they must not alias) with the current count.
        Reads the step count from the device (one sync): call it right before a save."""
        from torch.optim.optimizer import _get_scalar_dtype

        nstep = float(self.step_t)
        grp = opt.param_groups[0]
        fused = bool(grp.get("fused"))
        on_dev = fused or bool(grp.get("capturable"))
        if lr is not None:
            for g in opt.param_groups:
                g["lr"] = float(lr)
        if nstep == 0:
            return
        for p, m, v in self._views():
            step = torch.tensor(nstep, dtype=_get_scalar_dtype(is_fused=fused), device=p.device if on_dev else "cpu")
            opt.state[p] = {"step": step, "exp_avg": m, "exp_avg_sq": v}
