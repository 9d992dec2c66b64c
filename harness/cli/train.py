"""`dpharness train INPUT.json`: train your own model with a (fast) variant, the input unchanged."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train(a: argparse.Namespace) -> int:
    from harness.core.errors import whole_number
    from harness.run import user_train

    from harness.core.errors import UserError

    gpus = whole_number(a.gpus, 1, f"--gpus must be a whole number, not {a.gpus!r}", "--gpus must be at least 1, not {n}")
    if a.resume is not None:
        if a.output is not None and Path(a.output).resolve() != Path(a.resume).resolve():
            raise UserError(f"--resume {a.resume} continues in that folder; --output {a.output} names another")
        req = user_train.resume_request(Path(a.resume), a.variant, None if a.device == "auto" else a.device)
        if a.input is not None and Path(a.input).resolve() != req.input_path.resolve():
            raise UserError(f"--resume {a.resume} trained {req.input_path}, not {a.input}")
        req.freeze, req.gpus = a.freeze, gpus
        req.follow_upstream_order = req.follow_upstream_order or a.follow_upstream_order
    elif a.input is None:
        raise UserError("dpharness train needs INPUT.json (or --resume OUTPUT_DIR)")
    else:
        req = user_train.TrainRequest(
            input_path=Path(a.input), variant=a.variant, output=Path(a.output) if a.output else None,
            restart=Path(a.restart) if a.restart else None, init_model=Path(a.init_model) if a.init_model else None,
            freeze=a.freeze, device=a.device, follow_upstream_order=a.follow_upstream_order, gpus=gpus)
    rec = user_train.run(req, log=lambda m: print(m, file=sys.stderr))
    last = ", ".join(f"{k} {v:.3g}" for k, v in rec.final_lcurve.items() if k != "step")
    ranks = f" on {rec.world_size} processes" if rec.world_size > 1 else ""
    print(f"{rec.variant}: {rec.numb_steps} steps{ranks} in {rec.wall_s:.1f} s; last lcurve row (step "
          f"{rec.steps_lcurve}): {last or 'none'}")
    for name, path in rec.outputs.items():
        print(f"  {name}: {path}")
    return 0


def register_cli(sub) -> None:
    t = sub.add_parser("train", help="train a model on your own input.json with a variant (input unchanged)")
    t.add_argument("input", nargs="?", help="upstream DeePMD-kit input.json; data paths relative to its folder "
                   "(optional with --resume)")
    t.add_argument("--variant", default=None,
                   help="variant to train with (default: fused when its engine trains the input, else baseline)")
    t.add_argument("--output", default=None, help="output folder (default: <input's folder>/train-<variant>)")
    ck = t.add_mutually_exclusive_group()
    ck.add_argument("--restart", default=None, metavar="CKPT", help="continue from a checkpoint (upstream's --restart)")
    ck.add_argument("--init-model", default=None, metavar="CKPT",
                    help="start from a checkpoint's weights (upstream's --init-model)")
    ck.add_argument("--resume", default=None, metavar="OUTPUT_DIR",
                    help="continue a stopped or killed dpharness train in OUTPUT_DIR from its newest checkpoint "
                         "(same input and variant; the lcurve goes on from the checkpoint's step)")
    t.add_argument("--freeze", action="store_true", help="then `dp --pt freeze` into OUTPUT/frozen_model.pth")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda")
    t.add_argument("--gpus", default="1", metavar="N",
                   help="GPUs of this node, one process each (torchrun + NCCL, upstream's DDP semantics: "
                        "every rank takes batch_size frames per step)")
    t.add_argument("--follow-upstream-order", action="store_true",
                   help="the fast engine trains on the frames upstream's own sampler draws, step for step "
                        "(upstream's trajectory for the input's seed; slower on the host)")
    t.set_defaults(func=_train)
