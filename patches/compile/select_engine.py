"""compile: upstream's own Trainer and model, with se_e2_a's energy/force path traced by make_fx
and compiled (engines/dpfast/upstream_compile.py)."""
from dpfast import upstream_compile

upstream_compile.install()
