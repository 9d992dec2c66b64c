"""Code that runs inside the training process: launch, step clock, patch loading, parity."""
