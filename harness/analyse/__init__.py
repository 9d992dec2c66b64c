"""After a run: profiler traces and Nsight Compute."""
