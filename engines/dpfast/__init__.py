"""dpfast: the harness's fast training engine for upstream DeePMD-kit's se_e2_a energy models.

Upstream's ``dp --pt train`` still builds model, statistics, loss, learning-rate schedule,
optimizer settings, data and checkpoints; dpfast replaces the training loop:

* ``geometry``   neighbour lists, R~ and dR~/dr of periodic frames, stored precomputed, compact
                 (4 B/pair, re-formed in the step) or on the fly;
* ``flat_optim`` parameters and gradients as views of flat buffers, one Adam/AdamW over them;
* ``support``    what the engines train (anything else is refused with ``Unsupported``);
* ``prediction`` the model half: geometry of type-sorted frames, upstream's nets on R~, energy,
                 autograd forces and virial (Predictor);
* ``device_data`` training frames resident on the device, the step's batch drawn and gathered
                 there, upstream's loss on it (DeviceData);
* ``graph``      the training half: flat optimizer, the whole step in one CUDA graph, the loop
                 (lcurve, checkpoints, validation) and the accuracy-gate hooks (GraphEngine);
* ``analytic_nets``  upstream's MLPs with hand-written derivatives (VJP, forward-mode tangent),
                 per net and grouped over row chunks;
* ``analytic_energy``  energy and dE/dR~ written out with them (one backward per step);
* ``fused``      GraphEngine with that analytic path, its knobs, the step compiled by Inductor
                 inside the CUDA graph (FusedEngine);
* ``ran``        what the engine really ran (compiled or eager, CUDA graphs, graph breaks,
                 fallback), written into the run record; a failed compile/capture is CaptureFailed;
* ``trainer``    ``install(name)``: the engine that upstream's Trainer.run trains with, and the
                 accuracy-gate hooks;
* ``stats``      upstream's neighbour lists for what the engine keeps of upstream (input
                 statistics, the validation forward) through cell lists: linear memory;
* ``upstream_compile``  the ``compile`` variant: make_fx + Inductor of upstream's own
                 energy/force path inside upstream's own loop.
"""
