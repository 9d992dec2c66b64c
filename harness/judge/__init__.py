"""The accuracy gate: dp test/freeze processes, parity, calibration, the verdict."""
