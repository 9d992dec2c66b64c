"""Patch module of the ``compile`` variant: torch.compile (Inductor) of upstream's energy/force
path, made to work through the force loss's double backward.

Only the training model's ``forward_common_lower`` (of the class ``make_model`` builds for
upstream's EnergyModel) is swapped; upstream's Trainer, data loader, EnergyStdLoss, Adam and
checkpoints run unchanged. See README.md next to this file for the design and its limits.

Per call (training mode, se_e2_a energy model, nothing exotic requested) the swapped method:

1. runs upstream's ``format_nlist`` / ``_input_type_cast`` eagerly, as upstream does;
2. pads the extended region to a multiple of ``DPH_COMPILE_BUCKET`` (default 256) atoms with
   far-away dummies that no neighbour-list entry references (their force is exactly zero);
3. looks up (or builds) a compiled callable for the static shapes, dtype, device and - when the
   descriptor branches on atom types (type_one_side false) - the local atom types' content;
4. calls it with upstream's live nn.Parameters/buffers as explicit inputs, strips the padding
   and returns exactly the dict upstream's ``fit_output_to_model_output`` builds.

Building a callable: ``make_fx`` traces a pure function (params, buffers, coord, nlist[, atype])
-> (atom energy, mask, energy, dE/dr, virial, reduced virial) that calls
``torch.autograd.grad(E, coord, create_graph=True)`` inside the trace, so the first derivative is
ordinary aten ops in the FX graph; the graph is repaired (detach chains stripped, baked boolean
type masks turned into integer indices, fresh node list) and handed to ``torch.compile``.
The optimizer's backward is then a first-order backward through the compiled graph.

Environment: DPH_COMPILE_BACKEND (default ``inductor``; tests may use ``aot_eager``),
DPH_COMPILE_BUCKET (default 256), DPH_COMPILE_DISABLE=1 (always upstream's path).
"""
from __future__ import annotations

import hashlib
import logging
import os
import time

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from deepmd.pt.model.model import ener_model as _ener_model
from deepmd.pt.utils import env as _env

log = logging.getLogger("deepmd.compile")



def backend() -> str:
    """torch.compile backend (read at each build, so a test can pick aot_eager)."""
    return os.environ.get("DPH_COMPILE_BACKEND") or "inductor"


def bucket() -> int:
    return max(1, int(os.environ.get("DPH_COMPILE_BUCKET") or 256))


def disabled() -> bool:
    return os.environ.get("DPH_COMPILE_DISABLE", "") not in ("", "0")

FAR = 1.0e4  # padding atoms sit here (Angstrom); nothing references them, any finite value works

# the class make_model(DPEnergyAtomicModel) built; EnergyModel inherits forward_common_lower from it
TARGET = _ener_model.DPEnergyModel_
_upstream_lower = TARGET.forward_common_lower

STATS = {"compiled_calls": 0, "fallback_calls": 0, "builds": 0, "build_s": []}
_said: set[str] = set()
_CACHE_ATTR = "_dph_compile_cache"
_REASON_ATTR = "_dph_compile_reason"

# ops whose output shape depends on data: none may remain in a graph handed to the compiler
_DYNAMIC_OPS = {
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.item.default,
    torch.ops.aten._local_scalar_dense.default,
}
_INDEX_OPS = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
    torch.ops.aten._unsafe_index.Tensor,
    torch.ops.aten._unsafe_index_put.default,
}


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


def _mutated(node) -> bool:
    """Whether some user writes into `node` (in-place op with `node` as a written argument)."""
    for u in node.users:
        schema = getattr(u.target, "_schema", None)
        if schema is None or not schema.is_mutable:
            continue
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                v = u.args[i] if i < len(u.args) else u.kwargs.get(a.name)
                if v is node:
                    return True
    return False


def _fold(gm: torch.fx.GraphModule, node, memo: dict):
    """The value of `node` if it depends on baked constants only (the atom types), else None."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node in memo:
        return memo[node]
    val = None
    if node.op == "get_attr":
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        val = obj if isinstance(obj, torch.Tensor) else None
    elif node.op == "call_function" and not _mutated(node):
        schema = getattr(node.target, "_schema", None)
        seeded = torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())
        if schema is not None and not schema.is_mutable and not seeded:
            ins = {n: _fold(gm, n, memo) for n in node.all_input_nodes}
            if all(v is not None for v in ins.values()):
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: ins[n])
                val = node.target(*args, **kwargs)
                val = val if isinstance(val, torch.Tensor) else None
    memo[node] = val
    return val


def _bool_indices_to_long(gm: torch.fx.GraphModule) -> int:
    """x[mask] with a constant boolean mask has a data-dependent shape the compiler cannot take;
    the mask is a baked constant (the atom types are part of the cache key), so replace it by
    the equivalent constant integer indices (mask.nonzero()), which make every shape static."""
    n = 0
    memo: dict = {}
    made: dict = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _INDEX_OPS:
            continue
        idx = node.args[1]
        if not isinstance(idx, (list, tuple)):
            continue
        new_idx, changed = [], False
        for ent in idx:
            t = _fold(gm, ent, memo)
            if t is not None and t.dtype == torch.bool:
                if ent not in made:
                    cols = t.nonzero().unbind(1)
                    nodes = []
                    with gm.graph.inserting_before(node):
                        for c in cols:
                            name = f"_dph_index_{len(gm._dph_consts)}"
                            gm._dph_consts.append(name)
                            gm.register_buffer(name, c.contiguous().clone())
                            nodes.append(gm.graph.get_attr(name))
                    made[ent] = nodes
                new_idx.extend(made[ent])
                changed = True
            else:
                new_idx.append(ent)
        if changed:
            args = list(node.args)
            args[1] = new_idx
            node.args = tuple(args)
            n += 1
    gm.graph.eliminate_dead_code()
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


def _build(model, nframes: int, nloc: int, nallp: int, atype_const, sample: tuple):
    """Trace the pure energy/force function with make_fx and compile it."""
    am = model.atomic_model
    slots = _slots(am)
    names = [n for n, _ in am.named_parameters()] + [n for n, _ in am.named_buffers()]
    k = len(names)
    assert len(slots) == k
    redu_prec = _env.GLOBAL_PT_ENER_FLOAT_PRECISION

    def energy_and_forces(*args):
        for (mod, kind, attr), t in zip(slots, args[:k]):
            getattr(mod, kind)[attr] = t
        coord, nlist = args[k], args[k + 1]
        atype = atype_const if atype_const is not None else args[k + 2]
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
        gm = make_fx(energy_and_forces, tracing_mode="real")(*sample)
    finally:
        for mod, kind, attr, t in saved:
            getattr(mod, kind)[attr] = t
    gm._dph_consts = []
    n_detach = _strip_detach(gm)
    n_index = _bool_indices_to_long(gm)
    gm.graph.lint()
    gm.recompile()
    consts = [(n, getattr(gm, n)) for n in gm._dph_consts]
    gm = _rebuild(gm)
    for n, t in consts:  # node_copy keeps get_attr targets; GraphModule(gm, g) copies them over
        if not hasattr(gm, n):
            gm.register_buffer(n, t)
    _check_static(gm)
    nodes = sum(1 for _ in gm.graph.nodes)
    log.info("compile: traced %d nodes (stripped %d detach, %d boolean indexings made static) for "
             "nf=%d nloc=%d nall(padded)=%d; backend %s", nodes, n_detach, n_index, nframes, nloc,
             nallp, backend())
    compiled = torch.compile(gm, backend=backend(), dynamic=False, fullgraph=True)
    return compiled, names


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
    bake = not am.descriptor.sea.type_one_side  # per-type boolean masks on the centre atoms
    key = (nframes, nloc, nallp, nsel, coord.dtype, str(coord.device), model.training,
           hashlib.sha1(atype_host.numpy().tobytes()).hexdigest() if bake else None)
    tensors = [p for _, p in am.named_parameters()] + [b for _, b in am.named_buffers()]
    extra = [] if bake else [atype.contiguous()]
    cache = _cache(model)
    entry = cache.get(key)
    t0 = None
    if entry is None:
        t0 = time.perf_counter()
        sample = tuple(t.detach() for t in tensors) + (coord, nlist, *extra)
        entry = _build(model, nframes, nloc, nallp, atype.detach().clone() if bake else None, sample)
        cache[key] = entry
    fn, names = entry
    out = fn(*tensors, coord, nlist, *extra)
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


_saved_hook: list = []


def install() -> None:
    """Swap forward_common_lower and register the accuracy-gate hook (idempotent)."""
    if TARGET.__dict__.get("forward_common_lower") is forward_common_lower:
        return
    import torch._dynamo.config as dynamo_config

    # the compiled region sits inside upstream's DDP wrapper; DDPOptimizer would split it at
    # bucket boundaries as if it were the whole model (upstream's SeZM note 5)
    dynamo_config.optimize_ddp = False
    TARGET.forward_common_lower = forward_common_lower
    try:
        from harness import runtime as _runtime

        _saved_hook[:] = [_runtime.parity_forward]
        _runtime.parity_forward = parity_forward
    except Exception:  # noqa: BLE001  (outside the harness)
        pass


def uninstall() -> None:
    """Put upstream's method (and the previous gate hook) back; for tests."""
    TARGET.forward_common_lower = _upstream_lower
    if _saved_hook:
        from harness import runtime as _runtime

        _runtime.parity_forward = _saved_hook.pop()


def parity_forward(model, coord, atype, box):
    """Accuracy-gate hook: upstream's forward (training mode, so the compiled path), and a loud
    failure if an eligible model did not go through the compiled graph."""
    before = STATS["compiled_calls"]
    out = model(coord.reshape(coord.shape[0], -1), atype, box=box)
    if model_reason(model) is None and model.training and STATS["compiled_calls"] == before:
        raise RuntimeError("compile: the gate's forward did not run the compiled path")
    return out


install()
