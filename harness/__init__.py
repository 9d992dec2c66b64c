"""dpharness: build, train, check and report optimisation variants of upstream DeePMD-kit.

Stages, one module each, data flowing one way:
  upstream (pin) -> build (variant tree) -> systems -> train (run) -> accuracy
  -> profile -> results (store) -> report
Records passed between stages are dataclasses in ``harness.core.records``.
"""
__version__ = "0.1.0"
