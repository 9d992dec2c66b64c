"""Creates the harness's virtual environment (.venv) with nothing installed by hand.

Stdlib only: it runs before any dependency exists. Rules:
* If the invoking python already has torch (a CUDA+PyTorch image), the venv sees that python's
  site-packages through a .pth file, so the image's torch/jax/numpy are used untouched.
  Otherwise CPU torch (harness/pins/dev.txt) is installed.
* Upstream's runtime requirements come from wheelhouse/ with --no-index when that folder exists
  (offline GPU nodes), else from the package index.
* The repo root and engines/ go on the venv's path through a .pth file (no build backend needed
  offline).
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINS = ROOT / "harness" / "pins"
RECIPE = 2  # bump when what main() writes into the venv changes (not only the pins)


def _pip(py: Path, *args: str) -> None:
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        noise = ("WARNING: Location", "DEPRECATION")
        sys.stderr.write("".join(l + "\n" for l in (r.stdout + r.stderr).splitlines() if not l.startswith(noise)))
        sys.exit(f"dpharness bootstrap: `pip install {' '.join(args)}` failed "
                 f"(offline? run `make wheelhouse` where there is internet and copy wheelhouse/ here)")


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except Exception:
        return False
    return True


def main() -> int:
    dev = "--dev" in sys.argv
    target = ROOT / ".venv"
    wheelhouse = ROOT / "wheelhouse"
    key = hashlib.sha256()
    for f in sorted(PINS.glob("*.txt")):
        key.update(f.read_bytes())
    key.update(f"{sys.executable} dev={dev} wh={wheelhouse.is_dir()} recipe={RECIPE}".encode())
    stamp = target / ".dph-ready"
    if stamp.is_file() and stamp.read_text() == key.hexdigest():
        return 0
    # a stamp for --dev also serves plain use
    if not dev and stamp.is_file() and (target / ".dph-dev").is_file():
        return 0
    print(f"dpharness bootstrap: preparing {target} (one-time)", file=sys.stderr)
    venv.EnvBuilder(with_pip=True, clear=False).create(target)
    py = target / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # the harness and the engines (engines/dpfast) importable in the venv; a training child puts
    # its build's frozen engine copy before these (harness/child/patch_loader.py)
    (site / "dpharness_repo.pth").write_text(f"{ROOT}\n{ROOT / 'engines'}\n")
    image = _has_torch()
    if image:
        paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        (site / "dpharness_image.pth").write_text("\n".join(sorted(paths)) + "\n")
        print(f"dpharness bootstrap: using this python's torch ({sys.executable})", file=sys.stderr)
    offline = ["--no-index", "--find-links", str(wheelhouse)] if wheelhouse.is_dir() else []
    reqs = ["-r", str(PINS / "runtime.txt")]
    if not image:
        torch_pin = [l for l in (PINS / "dev.txt").read_text().splitlines() if l.startswith("torch")]
        _pip(py, *torch_pin)
    if offline and image:
        _pip(py, *offline, *reqs)
    else:
        _pip(py, *reqs)
    if dev:
        _pip(py, *[l for l in (PINS / "dev.txt").read_text().splitlines() if l and not l.startswith(("#", "torch"))])
        (target / ".dph-dev").write_text("")
    script = target / "bin" / "dpharness"
    script.write_text(f"#!{py}\nimport sys\nfrom harness.cli.main import main\nsys.exit(main())\n")
    script.chmod(0o755)
    stamp.write_text(key.hexdigest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
