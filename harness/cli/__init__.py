"""The `dpharness` command line: argument parsing and one entry per command (main.py); the
sweep/tune driver (sweep.py)."""
