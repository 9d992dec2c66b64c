"""Training engine of the ``graph`` variant.

Upstream (``deepmd.pt.train.training.Trainer``) builds everything: model with its
statistics, loss, learning-rate schedule, optimizer settings and data. This engine
replaces only the training loop:

* all training frames live on the device, with their neighbour list, normalised
  environment matrix R~ and its Jacobian dR~/dr precomputed once (frames never move
  during training; davg/dstd are constant buffers);
* a batch is sampled on the device (system by upstream's sampler weights, frame
  uniform within the system), gathered into static buffers;
* energy = upstream's own embedding / fitting networks applied to R~ (functional
  descriptor assembly reading upstream's nn.Parameters), forces
  F = -sum (dE/dR~) (dR~/dr) scattered to atoms i and j, virial from the same pieces;
* the loss is upstream's own loss module, called on these predictions with the
  learning rate as a device tensor;
* on CUDA the whole step (sampling, forward, forces, loss, backward, Adam step,
  LR update) is captured in one CUDA graph per shape group and replayed.

``GraphEngine`` is the training half: set-up from upstream's Trainer, the flat optimizer, the
step, its CUDA-graph capture and the loop (lcurve, checkpoints, validation), plus the
accuracy-gate hooks. The model half (geometry, energy, forces) is ``prediction.Predictor``, the
device-resident data and batches ``device_data.DeviceData``; what is refused, ``support``.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from . import flat_optim, ran
from .device_data import DeviceData, ShapeGroup
from .options import EngineOptions
from .prediction import Predictor
from .support import check_supported, refuse

log = logging.getLogger("deepmd.graph")


class _DDPRemoved(torch.nn.Module):
    """Stands where upstream's DDP wrapper stood, so `trainer._get_inner_module()` (save_model,
    validation) still finds the model at `.module`."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def _drop_ddp(trainer: Any) -> None:
    """Data parallel: the engine averages the flat gradient itself and never calls DDP's forward,
    but DDP's reducer keeps every parameter's AccumulateGrad node alive, created on the default
    stream when upstream built DDP. Autograd then syncs the capture stream with the default
    stream and invalidates the CUDA-graph capture (seen on H200: cudaErrorStreamCaptureInvalidated
    after "The AccumulateGrad node's stream does not match ..."). So DDP goes, its model stays."""
    import gc

    from torch.nn.parallel import DistributedDataParallel

    w = getattr(trainer, "wrapper", None)
    if isinstance(w, DistributedDataParallel):
        trainer.wrapper = _DDPRemoved(w.module)
        del w
        gc.collect()
        log.info("graph: upstream's DDP wrapper dropped (the engine all-reduces the flat gradient itself)")


class GraphEngine(Predictor, DeviceData):
    """The graph variant's training loop over upstream's Trainer (see the module docstring)."""

    def __init__(self, trainer: Any = None, device: torch.device | None = None,
                 opts: EngineOptions | None = None, model: Any = None) -> None:
        """trainer: upstream's Trainer (training); None with `model`: predict only (for_model,
        the accuracy gate's parity), no data, optimizer or record."""
        if trainer is None:
            Predictor.__init__(self, model, device, opts)
            self.ran = None
            return
        check_supported(trainer)
        self.tr = trainer
        _drop_ddp(trainer)
        Predictor.__init__(self, trainer.model, device, opts)
        self.loss = trainer.loss
        self.params = list(trainer.wrapper.parameters())
        self._upstream_opt = trainer.optimizer
        # data parallel: torch.distributed was initialised by upstream's `dp --pt train` (torchrun
        # sets LOCAL_RANK); its DDP wrapper is gone (_drop_ddp) and the engine averages the flat
        # gradient itself.
        self.rank = int(getattr(trainer, "rank", 0) or 0)
        self.world_size = int(getattr(trainer, "world_size", 1) or 1)
        self.distributed = bool(getattr(trainer, "is_distributed", False)) and self.world_size > 1
        self._build_lr_table()
        # train on the very frames upstream's sampler draws (DeviceData.upstream_batch) instead of
        # the engine's own device-side draw: same frames, same trajectory (issue 41)
        self.follow_upstream_order = self.opts.follow_upstream_order
        self.ran = ran.Ran(engine=self.engine_name, device=self.device.type, forces="autograd",
                           order="upstream" if self.follow_upstream_order else "engine",
                           options=self.opts.as_dict())

    engine_name = "graph"

    # ------------------------------------------------------------------ lr
    def _build_lr_table(self) -> None:
        tr = self.tr
        base = float(tr.lr_schedule.start_lr)
        # upstream's LambdaLR: lr = base * (value(step) / base)
        self.lr_values = [base * (tr.lr_schedule.value(s) / base) for s in range(tr.num_steps)]

    # ------------------------------------------------------------------ step
    def forward_backward(self, G: ShapeGroup, lr: Any, idx: torch.Tensor | None = None):
        """Sample, gather, predict, upstream's loss, gradients into the flat gradient buffer."""
        if idx is None:
            idx = self.sample(G)
        rt, jac, jidx, diff, labels = self.gather(G.geom, G.labels, idx)
        pred = self.predict(rt, jac, jidx, diff, G.tcount, G.bias, create_graph=True)
        loss, more = self.loss_and_more(pred, labels, lr, **G.loss_inputs())
        self.flat.grads_from_loss(loss)
        return loss, more

    def all_reduce_grads(self) -> None:
        """Data parallel: SUM of the flat gradient over the ranks (eager; outside any CUDA graph)."""
        if self.distributed:
            self.flat.all_reduce_grads()

    def update(self) -> None:
        """Average (data parallel) and the flat Adam/AdamW step."""
        if self.distributed:
            self.flat.divide_grads(self.world_size)
        self.opt.step()

    def train_step(self, G: ShapeGroup, lr: Any, idx: torch.Tensor | None = None):
        loss, more = self.forward_backward(G, lr, idx)
        self.all_reduce_grads()
        self.update()
        return loss, more

    # ------------------------------------------------------------ optimizer
    def make_optimizer(self) -> None:
        """Flat parameter/gradient/moment buffers and the flat Adam/AdamW (flat_optim.py).
        Upstream's optimizer stays ``tr.optimizer``; its state is pointed at the flat buffers
        before every save (``sync_optimizer_state``), so upstream's checkpoints are unchanged."""
        tr = self.tr
        up = self._upstream_opt
        d = dict(getattr(up, "defaults", {}) or {})
        if d.get("amsgrad") or d.get("maximize"):
            refuse("Adam amsgrad/maximize")
        betas = (float(tr.opt_param["adam_beta1"]), float(tr.opt_param["adam_beta2"]))
        wd = float(tr.opt_param["weight_decay"])
        eps = float(d.get("eps", 1e-8))
        start = tr.start_step
        lr0 = self.lr_values[start] if start < len(self.lr_values) else 0.0
        self.flat = flat_optim.FlatParams(self.params)
        if self.cuda:
            self.lr_table = torch.tensor(self.lr_values + [self.lr_values[-1] if self.lr_values else 0.0], dtype=torch.float64, device=self.device)
            self.step_ctr = torch.full((1,), start, dtype=torch.int64, device=self.device)
            self.lr_t = torch.tensor(lr0, dtype=torch.float64, device=self.device)
            lr = self.lr_t
        else:
            lr = lr0
        self.opt = flat_optim.FlatAdam(self.flat, decoupled=tr.opt_type == "AdamW", lr=lr, betas=betas, eps=eps,
                                       weight_decay=wd, step_device=self.device, opts=self.opts)
        # restart: carry upstream's loaded optimizer state over
        if up is not None and len(up.state) > 0:
            self.opt.load_from_torch(up)
        nparam = sum(b["flat"].numel() for b in self.flat.buckets)
        log.info("graph: flat %s over %d parameter tensors (%d values, %d bucket(s)%s)", tr.opt_type,
                 len(self.flat.params), nparam, len(self.flat.buckets),
                 f"; data parallel over {self.world_size} ranks" if self.distributed else "")

    def sync_optimizer_state(self, lr: float) -> None:
        """Upstream's optimizer (tr.optimizer, what Trainer.save_model writes) <- the flat state."""
        if self._upstream_opt is not None:
            self.opt.sync_to_torch(self._upstream_opt, lr)
            self.tr.optimizer = self._upstream_opt

    # ------------------------------------------------------------- capture
    def _snapshot(self):
        return self.opt.snapshot()

    def _restore(self, snap) -> None:
        self.opt.restore(snap)
        self.step_ctr.fill_(self.tr.start_step)

    def _body_a(self, G: ShapeGroup):
        """Graph A: LR of this step, sample .. backward into the flat gradient."""
        idx = torch.clamp(self.step_ctr, max=self.lr_table.shape[0] - 1)  # warm-up may run past the end
        lr = self.lr_table.index_select(0, idx).reshape(())
        self.lr_t.copy_(lr)
        return self.forward_backward(G, self.lr_t, G.idx_in)  # idx_in: upstream's frames

    def _body_b(self) -> None:
        """Graph B: (average) + optimizer step + LR-step counter."""
        self.update()
        self.step_ctr.add_(1)

    def _replay(self, G: ShapeGroup) -> None:
        if self.distributed:
            # NCCL stays outside the graphs: graph A, an eager all_reduce of the flat gradient on
            # the current stream, graph B; queued back to back, no host sync.
            G.graph_a.replay()
            self.all_reduce_grads()
            G.graph_b.replay()
        else:
            G.graph.replay()

    def _warmup(self, s) -> None:
        with torch.cuda.stream(s):
            for _ in range(3):
                for G in self.groups:
                    self._body_a(G)
                    self.all_reduce_grads()
                    self._body_b()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()

    def prepare(self) -> None:
        """Make the step that the loop runs (on CUDA: captured) and publish what it is (ran.Ran)."""
        if self.cuda:
            self.capture()
        self._note_prepared()

    def _note_prepared(self) -> None:
        r = self.ran
        r.optimizer = "compiled" if getattr(self.opt, "compiled", None) is not None else "eager"
        r.cuda_graphs = sum(1 for G in self.groups for k in ("graph", "graph_a", "graph_b") if getattr(G, k) is not None)
        ran.publish(r)

    def capture(self) -> None:
        """One CUDA graph per group (single process) or two (data parallel: capturing NCCL inside
        one graph is possible, but it needs NCCL graph support we cannot test here; the split
        around an eager all_reduce is the robust choice)."""
        snap = self._snapshot()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        self._warmup(s)
        self._capture_started = True  # from here a failure is not a compile problem (see fused)
        if self.distributed:
            torch.distributed.barrier()
            torch.cuda.synchronize()
        # One memory pool for all groups' graphs: each replay writes every intermediate it reads,
        # graphs never run concurrently (one stream), and each group's outputs stay referenced
        # (G.out_*), so reuse across groups is safe in any replay order; separate pools cost
        # one step's workspace per group (Al-Cu-Mg has three groups).
        pool = torch.cuda.graph_pool_handle() if len(self.groups) > 1 else None
        for G in self.groups:
            if self.distributed:
                # thread_local: NCCL's watchdog thread keeps querying its events during capture
                ga = torch.cuda.CUDAGraph()
                with torch.cuda.graph(ga, pool=pool, capture_error_mode="thread_local"):
                    loss, more = self._body_a(G)
                gb = torch.cuda.CUDAGraph()  # B shares A's pool (always replayed right after A)
                with torch.cuda.graph(gb, pool=ga.pool(), capture_error_mode="thread_local"):
                    self._body_b()
                G.graph_a, G.graph_b = ga, gb
            else:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    loss, more = self._body_a(G)
                    self._body_b()
                G.graph = g
            G.out_loss = loss
            G.out_more = more
        torch.cuda.synchronize()
        self._restore(snap)
        torch.cuda.synchronize()

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        from deepmd.dpmodel.train import TrainingTimer
        from deepmd.loggers.training import format_training_message, format_training_message_per_task

        try:
            from harness.child import runtime
        except Exception:  # noqa: BLE001
            runtime = None
        tr = self.tr
        t_setup = time.time()
        host_seed = self._seed_ranks()
        self.build_data()
        self.make_optimizer()
        self.prepare()
        if self.cuda:
            mem = torch.cuda.memory_allocated(self.device)
            log.info("graph: CUDA graphs captured (%d%s), device memory allocated %d bytes", len(self.groups),
                     ", two per group around the gradient all_reduce" if self.distributed else "", mem)
        log.info("graph: setup %.1f s; %s", time.time() - t_setup, "CUDA-graph replay" if self.cuda else "eager (no CUDA)")

        chief = self.rank == 0  # as upstream: rank 0 alone writes lcurve, logs metrics, saves
        fout = open(tr.disp_file, mode="w" if not tr.restart_training else "a", buffering=1) if chief else None
        log.info("Start to train %d steps.", tr.num_steps)
        if self.distributed:
            log.info("Rank: %d/%d", self.rank, self.world_size)
        tr.wrapper.train()
        tr.step_timer = TrainingTimer(start_step=tr.start_step, num_steps=tr.num_steps, disp_freq=tr.disp_freq)
        # the group sequence: one host RNG seed shared by all ranks, so their graphs line up
        rng = np.random.default_rng(host_seed)
        ngroups = len(self.groups)
        # a resumed run on the engine's own sampler (harness/child/resume.py): the draws of the
        # steps before its start (group choice and frames; sampling is eager on every device, no
        # draw sits in a captured graph), the display steps' validation batches between them
        replay = getattr(tr, "_dph_replay", None)
        if replay is not None:
            replay(lambda: self.sample(self.groups[0 if ngroups == 1 else int(rng.choice(ngroups, p=self.group_prob))]))
        if runtime is not None:
            runtime.clock.claim("graph")
        for step_id in range(tr.start_step, tr.num_steps):
            if runtime is not None:
                runtime.clock.tick("graph")
            display_step_id = step_id + 1
            cur_lr = self.lr_values[step_id]
            idx = None
            if self.follow_upstream_order:
                gi, idx = self.upstream_batch(step_id)
            else:
                gi = 0 if ngroups == 1 else int(rng.choice(ngroups, p=self.group_prob))
            G = self.groups[gi]
            if self.cuda:
                if idx is not None:
                    G.idx_in.copy_(idx)
                self._replay(G)
                more = G.out_more
            else:
                for grp in self.opt.param_groups:
                    grp["lr"] = cur_lr
                _, more = self.train_step(G, cur_lr, idx)
            if chief and tr.display_in_training and (display_step_id % tr.disp_freq == 0 or display_step_id == 1):
                train_results = {}
                for k in sorted(more):
                    if "l2_" in k:
                        continue
                    v = more[k]
                    train_results[k] = float(v) if torch.is_tensor(v) else v
                valid_results = self._validate(cur_lr)
                log.info(format_training_message_per_task(batch=display_step_id, task_name="trn", rmse=train_results, learning_rate=cur_lr))
                if valid_results:
                    log.info(format_training_message_per_task(batch=display_step_id, task_name="val", rmse=valid_results, learning_rate=None))
                interval = tr.step_timer.record(display_step_id)
                if tr.timing_in_training:
                    log.info(format_training_message(batch=display_step_id, wall_time=interval.wall_time, eta=interval.eta, current_time=interval.timestamp))
                if tr.lcurve_should_print_header:
                    tr.print_header(fout, train_results, valid_results)
                    tr.lcurve_should_print_header = False
                tr.print_on_training(fout, display_step_id, cur_lr, train_results, valid_results)
            should_save = display_step_id == tr.num_steps or (
                tr.save_freq > 0 and display_step_id % tr.save_freq == 0 and step_id != tr.start_step
            )
            if should_save and chief:
                self.sync_optimizer_state(cur_lr)
                tr.latest_model = tr.ckpt_store.path_for(display_step_id)
                tr.save_model(tr.latest_model, lr=cur_lr, step=step_id)
                log.info(f"Saved model to {tr.latest_model}")
                tr.ckpt_store.publish(tr.latest_model)
        if self.cuda:
            torch.cuda.synchronize()
        if self.distributed:
            log.info("graph: rank %d/%d final parameter checksum %s", self.rank, self.world_size, self.flat.checksum())
        if chief and tr.timing_in_training:
            msg = tr.step_timer.format_average()
            if msg is not None:
                log.info(msg)
        if chief:
            log.info(f"Trained model has been saved to: {tr.save_ckpt}")
            fout.close()

    def _seed_ranks(self) -> int:
        """The host seed of the group sequence, and (data parallel) a rank-specific device RNG.

        Single process: unchanged (upstream seeded torch with mix_entropy([0, training.seed])).
        Data parallel: s0 = rank 0's torch.initial_seed(), broadcast; every rank seeds torch (its
        device generator, which draws the batches) with mix_entropy([rank, s0]), so ranks draw
        different batches even without training.seed, and the host RNG that picks the shape
        group gets s0 % 2**31 on every rank (same group sequence, so the graphs line up)."""
        s0 = int(torch.initial_seed())
        if not self.distributed:
            return self.rank + s0 % (2**31)
        from deepmd.pt.utils.utils import mix_entropy

        s0 = int(self.tr._broadcast_value_from_rank0(s0))
        torch.manual_seed(mix_entropy([self.rank, s0]))
        return s0 % (2**31)

    def _validate(self, cur_lr: float) -> dict:
        tr = self.tr
        if tr.validation_data is None:
            return {}
        # data parallel: tr.wrapper is _drop_ddp's shell (no forward); validate with the model
        # behind it (only rank 0 validates)
        wrapper = tr._get_inner_module() if self.distributed and hasattr(tr, "_get_inner_module") else tr.wrapper
        tr.wrapper.eval()
        single, sum_natoms = {}, 0
        try:
            for _ in range(tr.valid_numb_batch):
                input_dict, label_dict, _ = tr.get_data(is_train=False)
                if input_dict == {}:
                    return {}
                _, loss, more_loss = wrapper(**input_dict, cur_lr=cur_lr, label=label_dict)
                natoms = int((input_dict["atype"] >= 0).sum())
                sum_natoms += natoms
                for k, v in more_loss.items():
                    if "l2_" not in k:
                        single[k] = single.get(k, 0.0) + float(v) * natoms
        finally:
            # NB: unlike upstream we do not zero_grad here: the captured graph owns the
            # .grad buffers (they are overwritten by each replay anyway).
            tr.wrapper.train()
        return {k: v / sum_natoms for k, v in single.items()}
