"""Before a run: upstream pins, variant manifests and diffs, builds, systems, wheelhouse."""
