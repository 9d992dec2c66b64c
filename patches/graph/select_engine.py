"""graph: upstream's Trainer with the dpfast engine's graph loop (engines/dpfast/graph.py)."""
from dpfast import trainer

trainer.install("graph")
