# Sourced by the variants' GPU checks (repo root as cwd): the harness's own environment, so the
# checks run what `make bench` runs. `make venv` installs offline from wheelhouse/ and sees the
# image's torch through a .pth; the upstream tree is the harness's cached baseline build (wheel
# verified by sha256, fix-ups applied), unless DPH_UPSTREAM_TREE names another.
make venv >&2
PY=$PWD/.venv/bin/python
TREE=${DPH_UPSTREAM_TREE:-$("$PY" -c "from harness.prepare import build; print(build.build_variant('baseline').tree)")}
export PYTHONPATH="$TREE:$PWD"
echo "python: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)')  tree: $TREE"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -c "import torch, dargs, e3nn; from deepmd.pt.entrypoints.main import main; print('deepmd import ok, torch', torch.__version__)" 2>&1 | tail -2
