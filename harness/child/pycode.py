"""`python -m harness.child.pycode --tree TREE -- CODE [ARG ...]`: run CODE as `python -c CODE ARG ...`
would (sys.argv is ['-c', ARG, ...], __name__ is '__main__'), for driver code that runs upstream's
PyTorch backend from TREE -- the tests' hand-written upstream drivers. Spelled this way it is served
by the fork server (harness/child/forkserver.py) when DPH_FORK_SERVER is set: the ~5 s import of
upstream happens once per server, not once per driver. The caller vouches that CODE is PyTorch-only
(a fork of the server must not import TensorFlow: its import starts a thread)."""
from __future__ import annotations

import sys


def command(tree, code: str, *args: str) -> list[str]:
    """The argv of `python -c code args` with upstream's TREE first on sys.path, spelled so a fork
    server serves it; its environment needs the harness importable (paths.ROOT on PYTHONPATH)."""
    return [sys.executable, "-m", "harness.child.pycode", "--tree", str(tree), "--", code, *map(str, args)]


def main(argv: list[str]) -> None:
    if "--" not in argv or argv.index("--") + 1 >= len(argv):
        print("harness.child.pycode: usage: --tree TREE -- CODE [ARG ...]", file=sys.stderr)
        raise SystemExit(2)
    from harness.child import forkserver, patch_loader

    i = argv.index("--")
    tree = forkserver._arg(argv[:i], "--tree")
    if tree:  # as the fork server has it: the tree first, served or not
        patch_loader.put_on_path(tree, [])
    sys.argv = ["-c", *argv[i + 2:]]
    exec(compile(argv[i + 1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
    from harness.child import forkserver

    code = forkserver.delegate("harness.child.pycode", sys.argv[1:])
    if code is not None:
        sys.exit(code)
    main(sys.argv[1:])
