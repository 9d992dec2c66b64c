"""The ``compile`` engine: torch.compile (Inductor) of upstream's energy/force path, made to work
through the force loss's double backward. ``install()`` (called by patches/compile/select_engine.py)
puts it in place; ``uninstall()`` takes it out.

Only the training model's ``forward_common_lower`` (of the class ``make_model`` builds for
upstream's EnergyModel) is swapped; upstream's Trainer, data loader, EnergyStdLoss, Adam and
checkpoints run unchanged. See patches/compile/README.md for the design and its limits.

Per call (training mode, se_e2_a energy model, nothing exotic requested) the swapped method:

1. runs upstream's ``format_nlist`` / ``_input_type_cast`` eagerly, as upstream does;
2. pads the extended region to a multiple of ``DPH_COMPILE_BUCKET`` (default 256) atoms with
   far-away dummies that no neighbour-list entry references (their force is exactly zero);
3. looks up (or builds) a compiled callable for the static shapes, dtype and device (the atom
   types are a graph input, so every type layout of those shapes shares one graph);
4. calls it with upstream's live nn.Parameters/buffers as explicit inputs, strips the padding
   and returns exactly the dict upstream's ``fit_output_to_model_output`` builds.

Building a callable: ``make_fx`` traces a pure function (params, buffers, coord, nlist, atype)
-> (atom energy, mask, energy, dE/dr, virial, reduced virial) that calls
``torch.autograd.grad(E, coord, create_graph=True)`` inside the trace, so the first derivative is
ordinary aten ops in the FX graph. While tracing, se_e2_a's per-centre-type boolean indexing
(type_one_side false) is replaced by an exactly equivalent multiply with the type mask
(``static_type_masks.py``), so the graph has static shapes for any type layout. The graph is
repaired (detach chains stripped, fresh node list), checked for data-dependent ops and handed to
``torch.compile``.
The optimizer's backward is then a first-order backward through the compiled graph.

Environment: DPH_COMPILE_BACKEND (default ``inductor``; tests may use ``aot_eager``),
DPH_COMPILE_BUCKET (default 256), DPH_COMPILE_DISABLE=1 (always upstream's path).
"""
from __future__ import annotations

import logging
import time

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from dpfast import options  # absolute: tests also load this file as a module of its own
from dpfast.static_type_masks import BLOCK as _BLOCK, static_type_masks as _static_type_masks
from harness.core import rebind

from deepmd.pt.model.model import ener_model as _ener_model
from deepmd.pt.utils import env as _env

log = logging.getLogger("deepmd.compile")



def backend() -> str:
    """torch.compile backend (read at each build, so a test can pick aot_eager)."""
    return options.current().compile_backend


def bucket() -> int:
    """Padding multiple of the extended atom count. nall = nloc x (2a+1)(2b+1)(2c+1) (whole
    periodic images) is constant over all training frames of water (5184), copper and alcumg
    (2916 each): one graph per system at 256, 512 or 1024 alike, and 256 pads least (README)."""
    return options.current().upstream_compile_bucket


def disabled() -> bool:
    return options.current().upstream_compile_disable

FAR = 1.0e4  # padding atoms sit here (Angstrom); nothing references them, any finite value works

# the class make_model(DPEnergyAtomicModel) built; EnergyModel inherits forward_common_lower from it
TARGET = _ener_model.DPEnergyModel_


def _upstream_lower(*a, **k):
    """Upstream's forward_common_lower, as it was before install (never a copy taken at import)."""
    return rebind.original(TARGET, "forward_common_lower")(*a, **k)

STATS = {"compiled_calls": 0, "fallback_calls": 0, "builds": 0, "build_s": []}
_said: set[str] = set()
_CACHE_ATTR = "_dph_compile_cache"
_REASON_ATTR = "_dph_compile_reason"

def _aten(*names: str) -> set:
    """ATen op overloads by name ("nonzero.default")."""
    return {getattr(getattr(torch.ops.aten, n.split(".")[0]), n.split(".")[1]) for n in names}


# ops whose output shape depends on data: none may remain in a graph handed to the compiler
_DYNAMIC_OPS = _aten("nonzero.default", "masked_select.default", "unique_consecutive.default", "_unique2.default",
                     "item.default", "_local_scalar_dense.default")
_INDEX_OPS = _aten("index.Tensor", "index_put.default", "index_put_.default", "_index_put_impl_.default",
                   "_unsafe_index.Tensor", "_unsafe_index_put.default")


def _say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        log.warning("compile: %s", msg)


# ----------------------------------------------------------------------------- eligibility
def model_reason(model) -> str | None:
    """Why this model cannot take the compiled path (None: it can). Cached on the model."""
    cached = model.__dict__.get(_REASON_ATTR, False)
    if cached is not False:
        return cached
    reason = _model_reason(model)
    object.__setattr__(model, _REASON_ATTR, reason)
    return reason


def _model_reason(model) -> str | None:
    from deepmd.pt.model.atomic_model import DPEnergyAtomicModel
    from deepmd.pt.model.descriptor.se_a import DescrptSeA
    from deepmd.pt.model.task.ener import EnergyFittingNet

    if disabled():
        return "DPH_COMPILE_DISABLE is set"
    am = getattr(model, "atomic_model", None)
    if type(am) is not DPEnergyAtomicModel:
        return f"atomic model is {type(am).__name__}, not upstream's DPEnergyAtomicModel"
    d = am.descriptor
    if type(d) is not DescrptSeA:
        return f"descriptor is {type(d).__name__}, not se_e2_a (DescrptSeA)"
    if type(d.sea) is not _BLOCK:
        return f"se_e2_a block is {type(d.sea).__name__}, not upstream's DescrptBlockSeA"
    if getattr(d.sea, "compress", False):
        return "se_e2_a is compressed (tabulated custom op)"
    if not d.sea.emask.no_exclusion or am.pair_excl is not None or am.atom_excl is not None:
        return "exclude_types / atom_exclude_types are set (ghost atom types would matter)"
    if not isinstance(am.fitting_net, EnergyFittingNet):
        return f"fitting is {type(am.fitting_net).__name__}, not EnergyFittingNet"
    if am.get_dim_fparam() or am.get_dim_aparam():
        return "frame/atomic parameters (fparam/aparam) are not supported"
    if getattr(am, "add_chg_spin_ebd", False):
        return "charge/spin embedding is not supported"
    if getattr(model, "_hessian_enabled", False):
        return "Hessian outputs are requested"
    if list(am.fitting_output_def().keys()) != ["energy"]:
        return f"fitting outputs {list(am.fitting_output_def().keys())}, not just energy"
    if not (model.do_grad_r("energy") and model.do_grad_c("energy")):
        return "energy is not r- and c-differentiable"
    return None


def _call_reason(model, extended_coord, extended_atype, fparam, aparam, do_atomic_virial,
                 comm_dict, extended_coord_corr, charge_spin) -> str | None:
    if not model.training:
        return "eval mode (validation / inference) runs upstream's eager forward"
    if not torch.is_grad_enabled():
        return "grad mode is off"
    if extended_coord.requires_grad:
        return "input coordinates require grad (derivatives of forces w.r.t. coordinates)"
    if do_atomic_virial:
        return "atomic virial requested"
    if comm_dict is not None:
        return "parallel-inference comm_dict given"
    if extended_coord_corr is not None or charge_spin is not None or fparam is not None or aparam is not None:
        return "coord correction / charge_spin / fparam / aparam given"
    return None


# ----------------------------------------------------------------------------- FX repair
def _strip_detach(gm: torch.fx.GraphModule) -> int:
    """Remove every aten.detach. The traced function has no detach of its own that matters (its
    only one opens the coordinate leaf, whose gradient nobody asks for); the others are the
    autograd engine's saved-tensor detaches recorded by make_fx, which would cut the
    second-order path from the force loss back to the parameters."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.detach.default:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            n += 1
    return n


def _check_static(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _DYNAMIC_OPS:
            raise RuntimeError(f"traced graph has a data-dependent op {node.target} ({node.name})")
        if node.target in _INDEX_OPS and isinstance(node.args[1], (list, tuple)):
            for ent in node.args[1]:
                val = ent.meta.get("val") if isinstance(ent, torch.fx.Node) else None
                if isinstance(val, torch.Tensor) and val.dtype in (torch.bool, torch.uint8):
                    raise RuntimeError(f"traced graph indexes with a boolean mask at {node.name}")


def _rebuild(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A fresh GraphModule with a newly allocated node list (upstream saw Dynamo read stale
    pointers of erased nodes; copying is cheap)."""
    g = torch.fx.Graph()
    env: dict = {}
    for node in gm.graph.nodes:
        env[node] = g.node_copy(node, lambda n: env[n])
    g.lint()
    return torch.fx.GraphModule(gm, g)



# ----------------------------------------------------------------------------- build
def _slots(am) -> list:
    """(module, "_parameters"/"_buffers", name) in named_parameters() then named_buffers() order."""
    out = []
    for kind, it in (("_parameters", am.named_parameters()), ("_buffers", am.named_buffers())):
        for name, _ in it:
            mod_name, _, attr = name.rpartition(".")
            out.append((am.get_submodule(mod_name) if mod_name else am, kind, attr))
    return out


def _build(model, nframes: int, nloc: int, nallp: int, sample: tuple):
    """Trace the pure energy/force function with make_fx and compile it."""
    am = model.atomic_model
    slots = _slots(am)
    k = len(slots)
    redu_prec = _env.GLOBAL_PT_ENER_FLOAT_PRECISION

    def energy_and_forces(*args):
        for (mod, kind, attr), t in zip(slots, args[:k]):
            getattr(mod, kind)[attr] = t
        coord, nlist, atype = args[k], args[k + 1], args[k + 2]
        # ghosts: only `type >= 0` is read for them (no exclusions; checked by model_reason),
        # and every real atom type is >= 0 (checked per call), so type 0 stands for all of them
        ext_atype = torch.cat([atype, atype.new_zeros(nframes, nallp - nloc)], dim=1)
        x = coord.detach().requires_grad_(True)
        ret = am(x, ext_atype, nlist, mapping=None)
        energy, mask = ret["energy"], ret["mask"]
        energy_redu = torch.sum(energy.to(redu_prec), dim=1)
        (g,) = torch.autograd.grad([energy_redu], [x], grad_outputs=[torch.ones_like(energy_redu)],
                                   create_graph=True)
        force = -g
        virial = torch.einsum("...ik,...ij->...ikj", force, x).reshape(nframes, nallp, 9)
        derv_r = force.unsqueeze(-2)
        derv_c = virial.unsqueeze(-2)
        derv_c_redu = torch.sum(derv_c.to(redu_prec), dim=1)
        return energy, mask, energy_redu, derv_r, derv_c, derv_c_redu

    # parameters and buffers become explicit graph inputs: the module's slots hold the trace's
    # inputs while make_fx runs, and get the live tensors back afterwards. (torch.func's
    # functional_call under make_fx left 57 of 75 parameters of a test model replaced by plain
    # tensors on torch 2.13, so the slots are swapped here by hand.)
    saved = [(mod, kind, attr, getattr(mod, kind)[attr]) for mod, kind, attr in slots]
    try:
        with _static_type_masks(am.descriptor.sea):
            gm = make_fx(energy_and_forces, tracing_mode="real")(*sample)
    finally:
        for mod, kind, attr, t in saved:
            getattr(mod, kind)[attr] = t
    n_detach = _strip_detach(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm = _rebuild(gm)
    _check_static(gm)
    nodes = sum(1 for _ in gm.graph.nodes)
    log.info("compile: traced %d nodes (stripped %d detach) for nf=%d nloc=%d nall(padded)=%d; "
             "backend %s", nodes, n_detach, nframes, nloc, nallp, backend())
    compiled = torch.compile(gm, backend=backend(), dynamic=False, fullgraph=True)
    return compiled


def _cache(model) -> dict:
    c = model.__dict__.get(_CACHE_ATTR)
    if c is None:
        # a plain dict outside the nn.Module tree: the compiled wrappers must not be registered
        # as submodules (their parameters would be found twice by DDP / optimizers)
        c = {}
        object.__setattr__(model, _CACHE_ATTR, c)
    return c


def compiled_lower(model, extended_coord, extended_atype, nlist, extra_nlist_sort=False):
    """upstream's forward_common_lower for the eligible case, through the compiled graph."""
    nframes, nall = extended_atype.shape[:2]
    extended_coord = extended_coord.view(nframes, -1, 3)
    nlist = model.format_nlist(extended_coord, extended_atype, nlist, extra_nlist_sort=extra_nlist_sort)
    cc_ext, _, _, _, input_prec = model._input_type_cast(extended_coord)
    nloc, nsel = nlist.shape[1], nlist.shape[2]
    atype = extended_atype[:, :nloc]
    atype_host = atype.detach().cpu()
    if bool((atype_host < 0).any()):
        return None, "virtual atoms (type < 0) in the frame"
    b = bucket()
    nallp = -(-nall // b) * b
    coord = cc_ext.detach()
    if nallp > nall:
        coord = torch.cat([coord, coord.new_full((nframes, nallp - nall, 3), FAR)], dim=1)
    coord = coord.contiguous()
    nlist = nlist.contiguous()
    am = model.atomic_model
    # the atom types are a graph input (any type layout of these shapes shares the graph)
    key = (nframes, nloc, nallp, nsel, coord.dtype, str(coord.device), model.training)
    tensors = [p for _, p in am.named_parameters()] + [b for _, b in am.named_buffers()]
    atype = atype.contiguous()
    cache = _cache(model)
    entry = cache.get(key)  # the compiled callable
    t0 = None
    if entry is None:
        t0 = time.perf_counter()
        sample = tuple(t.detach() for t in tensors) + (coord, nlist, atype)
        entry = _build(model, nframes, nloc, nallp, sample)
        cache[key] = entry
    out = entry(*tensors, coord, nlist, atype)
    if t0 is not None:
        dt = time.perf_counter() - t0
        STATS["builds"] += 1
        STATS["build_s"].append(dt)
        log.info("compile: graph %d (nall %d -> %d) traced, compiled and run in %.1f s",
                 len(cache), nall, nallp, dt)
    energy, mask, energy_redu, derv_r, derv_c, derv_c_redu = out
    ret = {
        "energy": energy,
        "mask": mask,
        "energy_redu": energy_redu,
        "energy_derv_r": derv_r[:, :nall],
        "energy_derv_c": derv_c[:, :nall],
        "energy_derv_c_redu": derv_c_redu,
    }
    STATS["compiled_calls"] += 1
    return model._output_type_cast(ret, input_prec), None


def forward_common_lower(self, extended_coord, extended_atype, nlist, mapping=None, fparam=None,
                         aparam=None, do_atomic_virial=False, comm_dict=None, extra_nlist_sort=False,
                         extended_coord_corr=None, charge_spin=None):
    reason = model_reason(self) or _call_reason(self, extended_coord, extended_atype, fparam, aparam,
                                                do_atomic_virial, comm_dict, extended_coord_corr,
                                                charge_spin)
    if reason is None:
        ret, reason = compiled_lower(self, extended_coord, extended_atype, nlist, extra_nlist_sort)
        if ret is not None:
            return ret
    STATS["fallback_calls"] += 1
    _say_once(f"upstream's eager forward_common_lower used: {reason}")
    return _upstream_lower(self, extended_coord, extended_atype, nlist, mapping, fparam=fparam,
                           aparam=aparam, do_atomic_virial=do_atomic_virial, comm_dict=comm_dict,
                           extra_nlist_sort=extra_nlist_sort, extended_coord_corr=extended_coord_corr,
                           charge_spin=charge_spin)


BY = "dpfast.upstream_compile"


def install() -> None:
    """Replace forward_common_lower and register the accuracy-gate hook (idempotent), through
    harness.core.rebind (recorded; `uninstall` puts them back)."""
    if rebind.is_replaced(TARGET, "forward_common_lower"):
        return
    import torch._dynamo.config as dynamo_config
    from harness.child import runtime

    # the compiled region sits inside upstream's DDP wrapper; DDPOptimizer would split it at
    # bucket boundaries as if it were the whole model (upstream's SeZM note 5)
    rebind.replace(dynamo_config, "optimize_ddp", False, by=BY,
                   why="DDPOptimizer would split the compiled region at DDP's bucket boundaries")
    rebind.replace(TARGET, "forward_common_lower", forward_common_lower, by=BY,
                   why="the energy/force path through one make_fx + Inductor graph (upstream's eager where ineligible)")
    rebind.replace(runtime, "parity_forward", parity_forward, by=BY,
                   why="the accuracy gate's forward goes through the compiled path and fails loudly if it did not")


def uninstall() -> None:
    """Put upstream's method, dynamo's setting and the previous gate hook back; for tests."""
    rebind.restore(BY)


def parity_forward(model, coord, atype, box):
    """Accuracy-gate hook: upstream's forward (training mode, so the compiled path), and a loud
    failure if an eligible model did not go through the compiled graph."""
    before = STATS["compiled_calls"]
    out = model(coord.reshape(coord.shape[0], -1), atype, box=box)
    if model_reason(model) is None and model.training and STATS["compiled_calls"] == before:
        raise RuntimeError("compile: the gate's forward did not run the compiled path")
    return out
