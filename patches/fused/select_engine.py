"""fused: upstream's Trainer with the dpfast engine's fused loop (engines/dpfast/fused.py); its
knobs come from the manifest's env (DPH_FUSED_*, DPH_FLAT_ADAM_COMPILE)."""
from dpfast import trainer

trainer.install("fused")
