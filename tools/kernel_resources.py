"""Shared memory, registers and spill stack of every Triton embedding kernel built for sm_90,
on any machine (no GPU needed): engines/dpfast/kernel_resources.py.
Usage: python tools/kernel_resources.py [--slots 46,92] [--rows 16,32] [--warps 4,8] [--kernel weight_vjp] [--halves] [--json FILE]"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "engines"))

from dpfast import kernel_resources as kr  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slots", default="92")
    p.add_argument("--rows", default="", help="tile rows to try (default: the engine's)")
    p.add_argument("--warps", default="", help="warps to try (default: the engine's)")
    p.add_argument("--kernel", action="append", default=[], help="only these kernels (repeatable; default: all)")
    p.add_argument("--halves", action="store_true", help="the weight VJP's last layer by column halves")
    p.add_argument("--json", default="")
    a = p.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x] or [None]  # noqa: E731
    rows = []
    print(f"{'kernel':15} {'slots':>5} {'rows':>4} {'warps':>5} {'shared B':>9} {'fits':>4} {'regs':>4} {'stack B':>7}")
    for name, kernel, kind in kr.kernels():
        if a.kernel and name not in a.kernel:
            continue
        for slots in ints(a.slots):
            for r in ints(a.rows):
                for w in ints(a.warps):
                    consts = kr.se_e2_a_constants(slots, halves=a.halves)
                    res = dict(kernel=name, slots=slots, **kr.compile_sm90(kernel, consts, kind, r, w))
                    res["fits"] = kr.fits(res)
                    rows.append(res)
                    print(f"{name:15} {slots:5} {res['rows']:4} {res['warps']:5} {res['shared']:9} {'yes' if res['fits'] else 'NO':>4} "
                          f"{res['regs']:4} {res['stack']:7}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
