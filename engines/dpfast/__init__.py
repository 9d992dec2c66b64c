"""dpfast: the harness's fast training engine for upstream DeePMD-kit's se_e2_a energy models.

Upstream's ``dp --pt train`` still builds model, statistics, loss, learning-rate schedule,
optimizer settings, data and checkpoints; dpfast replaces the training loop:

* ``geometry``   neighbour lists, R~ and dR~/dr of periodic frames, stored precomputed, compact
                 (4 B/pair, re-formed in the step) or on the fly;
* ``flat_optim`` parameters and gradients as views of flat buffers, one Adam/AdamW over them;
* ``graph``      device-resident data, fixed shapes, autograd forces, the whole step in one CUDA
                 graph (GraphEngine);
* ``fused``      analytic forces (one backward), grouped nets and contractions, the step compiled
                 by Inductor inside the CUDA graph (FusedEngine);
* ``trainer``    ``install(name)``: the engine that upstream's Trainer.run trains with, and the
                 accuracy-gate hooks;
* ``upstream_compile``  the ``compile`` variant: make_fx + Inductor of upstream's own
                 energy/force path inside upstream's own loop.
"""
