"""A fork server for the harness's PyTorch child processes (issue 36): `import deepmd.pt` once, fork
a child per training, `dp test`, `dp freeze` or parity evaluation.

Every such child is `python -m harness.child.launch|parity_eval|pycode ...` and spends ~5-9 s importing
torch and deepmd before its first line of work; the test suite starts several hundred of them. With
``DPH_FORK_SERVER`` set to a folder (tests/conftest.py sets one per pytest worker), the command
stays exactly the same, but its first lines (``delegate``) hand the work to a server process that
has imported the child's upstream tree once: the server forks, the fork becomes the child (same
argv, environment, working directory and stdin/stdout/stderr, received over a UNIX socket) and
runs the module as ``python -m`` would. The process the harness started stays as a thin proxy, so
the harness observes what it observed before:

- its exit status is the child's (a child killed by a signal makes the proxy die of that signal);
- a signal to the proxy or its process group (SIGINT, SIGTERM, SIGHUP, ...) is passed on to the
  child; SIGKILL cannot be caught, so the server kills the child's whole group when the proxy's
  connection closes;
- the child is in its own session and dies with the server (PR_SET_PDEATHSIG); what is left of
  its process group when it exits (data-loader workers) is killed then, as a signal to a plain
  child's group would have taken them (a forwarded signal reaches the child alone).

What makes a fork safe, and so when a command is not served (it then runs as before): one server
per (interpreter, upstream tree, environment): every variable except the harness's own ``DPH_*`` and
pytest's ``PYTEST_*`` is part of the key, because deepmd and torch read theirs at import (DEVICE,
DP_INTERFACE_PREC, OMP_NUM_THREADS, TORCHINDUCTOR_*); the server imports upstream's modules only
-- never a variant's patch modules, our engine or ``harness.child.runtime`` (its start-up clock) --
and refuses to serve when that import started a thread or touched CUDA; only upstream's PyTorch
backends (``pt``, ``pt-expt``) on one process (torchrun's ranks and the other backends start as
before). After the fork the child
reseeds numpy's global generator (a new process draws a fresh one; Python's ``random`` reseeds
itself). The server exits when its folder is removed or after IDLE_S without a child.
The fork's command line stays the server's (`ps` shows harness.child.forkserver for it).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from harness.core import envvars

IDLE_S = 120.0  # a server holds ~0.5 GB: one idle this long goes (its key may never come back)
START_TIMEOUT_S = 600.0
SERVED = ("harness.child.launch", "harness.child.parity_eval", "harness.child.pycode")
# upstream's PyTorch backends: pt_expt costs 0.04 s to import once deepmd.pt is in
SERVED_BACKENDS = ("pt", "pt-expt")
SERVED_BACKEND_FLAGS = ("--pt", "--pytorch", "--pt-expt", "--pytorch-exportable")
PREIMPORTED = ("deepmd.main", "deepmd.pt.entrypoints.main", "deepmd.pt.train.training",
               "deepmd.pt_expt.train.training")
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "HOROVOD_RANK")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
# true in a child this server forked: its own `delegate` must run the work, not hand it on again
IN_CHILD = False


def _key_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items()
            if not k.startswith(("DPH_", "PYTEST_")) and k not in ("PWD", "OLDPWD", "_")}


def server_key(tree: str, env: dict[str, str]) -> str:
    """Which server may fork this child: same interpreter, same tree, same environment."""
    blob = json.dumps([sys.executable, str(Path(tree).resolve()), sorted(_key_env(env).items())])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _arg(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv[:-1]):
        if a == flag:
            return argv[i + 1]
    return None


def servable(module: str, argv: list[str], env: dict[str, str]) -> str | None:
    """The upstream tree to serve this child from, or None: run it as a plain process."""
    if IN_CHILD or env.get(envvars.DPH_FORK_SERVER) in (None, "", "0") or module not in SERVED:
        return None
    if sys.platform != "linux" or not hasattr(socket, "send_fds") or sys._xoptions or sys.flags.optimize:
        return None
    if any(env.get(v) not in (None, "") for v in RANK_VARS):
        return None  # a rank of torchrun/mpirun: its launcher owns the process
    if module == "harness.child.launch":
        dp_args = argv[argv.index("--"):] if "--" in argv else []
        if not any(flag in dp_args for flag in SERVED_BACKEND_FLAGS):
            return None
    elif module == "harness.child.pycode":  # its caller vouches for a PyTorch-only CODE
        return _arg(argv[:argv.index("--")] if "--" in argv else argv, "--tree")
    elif (_arg(argv, "--backend") or "pt") not in SERVED_BACKENDS:
        return None
    return _arg(argv, "--tree")


# ------------------------------------------------------------------ the proxy (the harness's child)

def delegate(module: str, argv: list[str]) -> int | None:
    """Run `python -m module argv` in a fork of a served interpreter and return its exit code (a
    child killed by a signal kills this process with it); None when it is not served here."""
    env = dict(os.environ)
    tree = servable(module, argv, env)
    if tree is None:
        return None
    folder = Path(env[envvars.DPH_FORK_SERVER])
    key = server_key(tree, env)
    pending: list[int] = []
    child = [0]

    def forward(sig, _frame):
        if child[0]:
            try:
                os.kill(child[0], sig)
            except ProcessLookupError:
                pass
        else:
            pending.append(sig)

    before = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    request = json.dumps({"module": module, "argv": argv, "env": env, "cwd": os.getcwd()}).encode()
    try:
        conn = _connect(folder, key, tree, env)
        socket.send_fds(conn, [struct.pack("!Q", len(request)) + request], [0, 1, 2])
        reader = conn.makefile("r")
        line = reader.readline()
        if not line.startswith("pid "):  # e.g. a server that closed at its idle timeout as we came
            raise OSError(f"no child started: {line.strip() or 'the server closed the connection'}")
    except OSError as e:  # nothing was started: this process runs the child itself
        print(f"dpharness fork server: not used ({e}); starting the child directly", file=sys.stderr)
        for sig, handler in before.items():
            signal.signal(sig, handler)
        for sig in pending:
            os.kill(os.getpid(), sig)
        return None
    child[0] = int(line.split()[1])
    for sig in pending:
        os.kill(child[0], sig)
    line = reader.readline()
    if not line.startswith("status "):
        print("dpharness fork server: lost the child's exit status (the server died)", file=sys.stderr)
        return 1
    status = int(line.split()[1])
    if os.WIFSIGNALED(status):  # die as the child died, so the harness sees -signal
        sig = os.WTERMSIG(status)
        if sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        time.sleep(5)
        return 128 + sig
    return os.waitstatus_to_exitcode(status)


def _connect(folder: Path, key: str, tree: str, env: dict[str, str]) -> socket.socket:
    """A connection to the key's server, started here (under a lock: one server per key) if none runs."""
    import fcntl
    import subprocess

    path = folder / f"{key}.sock"
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        return conn
    except OSError:
        pass
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            conn.connect(str(path))
            return conn
        except OSError:
            pass
        log = open(folder / f"{key}.log", "ab")
        server = subprocess.Popen([sys.executable, "-m", "harness.child.forkserver", str(path), tree],
                                  cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if server.poll() is not None:
                tail = (folder / f"{key}.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise OSError(f"the server exited {server.returncode}: {tail[0] if tail else ''}")
            try:
                conn.connect(str(path))
                return conn
            except OSError:
                time.sleep(0.05)
        server.kill()
        raise OSError(f"the server did not start in {START_TIMEOUT_S:.0f} s")


# ------------------------------------------------------------------ the server

def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def preimport(tree: str) -> None:
    """What every served child imports first: upstream's PyTorch entry points from this tree."""
    from harness.child import patch_loader

    import importlib

    patch_loader.put_on_path(tree, [])
    for name in PREIMPORTED:
        importlib.import_module(name)
    import torch

    if _threads() != 1 or torch.cuda.is_initialized():
        raise RuntimeError(f"importing upstream started {_threads()} threads or CUDA: a fork would not be safe")


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    if len(data) < 8:
        raise OSError("short request")
    n = struct.unpack("!Q", data[:8])[0]
    body = data[8:]
    while len(body) < n:
        more = conn.recv(n - len(body))
        if not more:
            raise OSError("request cut short")
        body += more
    if len(fds) != 3:
        raise OSError(f"{len(fds)} file descriptors, not 3")
    return json.loads(body), fds


def _become_child(request: dict, fds: list[int], open_sockets: list[socket.socket]) -> int:
    """In the fork: take the proxy's stdio, environment and folder, then run the module as -m would."""
    global IN_CHILD
    import atexit
    import ctypes
    import runpy
    import threading
    import traceback

    IN_CHILD = True
    for s in open_sockets:
        s.close()
    os.setsid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: dies with the server
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    if SERVER_CWD in sys.path:  # `python -m` puts the working directory first (after it, the tree)
        sys.path[sys.path.index(SERVER_CWD)] = request["cwd"]
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # a fresh process draws a fresh global state
    sys.argv = [request["module"], *request["argv"]]
    code = 0
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # noqa: BLE001 (as the interpreter reports an uncaught exception)
        traceback.print_exc()
        code = 1
    # the interpreter's own exit: other threads, then atexit, then flushed output
    try:
        threading._shutdown()
    except Exception:  # noqa: BLE001
        pass
    atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001
            pass
    if code == -signal.SIGINT:  # an uncaught KeyboardInterrupt ends a process by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    return code & 0xFF


SERVER_CWD = ""


def serve(sock_path: str, tree: str) -> int:
    global SERVER_CWD
    import selectors

    if __name__ != "harness.child.forkserver":  # IN_CHILD would not reach the fork's delegate
        raise RuntimeError("serve() runs through the module harness.child.forkserver")
    SERVER_CWD = sys.path[0] if sys.path else ""
    folder = Path(sock_path).parent
    try:
        preimport(tree)
    except Exception as e:  # noqa: BLE001 (the proxy reads this line and runs the child itself)
        print(f"not serving: {type(e).__name__}: {e}", flush=True)
        return 3
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{sock_path}.{os.getpid()}"
    listener.bind(tmp)
    listener.listen(64)
    os.replace(tmp, sock_path)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    by_pid: dict[int, socket.socket] = {}
    by_conn: dict[socket.socket, int] = {}
    last = time.monotonic()
    print(f"serving {tree} at {sock_path} (pid {os.getpid()})", flush=True)
    while True:
        for k, _ in sel.select(timeout=0.05):
            s = k.fileobj
            if s is listener:
                conn, _addr = listener.accept()
                try:
                    request, fds = _recv_request(conn)
                except (OSError, ValueError) as e:
                    print(f"bad request: {e}", flush=True)
                    conn.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        sel.close()
                        code = _become_child(request, fds, [listener, conn, *by_conn])
                    finally:
                        os._exit(code)
                for fd in fds:
                    os.close(fd)
                by_pid[pid] = conn
                by_conn[conn] = pid
                try:
                    conn.sendall(f"pid {pid}\n".encode())
                except OSError:
                    pass
                sel.register(conn, selectors.EVENT_READ)
            else:  # the proxy's end closed (it was killed): its child goes too
                try:
                    gone = not s.recv(64)
                except OSError:
                    gone = True
                if gone:
                    sel.unregister(s)
                    pid = by_conn.get(s)
                    if pid in by_pid:
                        for kill in (os.killpg, os.kill):
                            try:
                                kill(pid, signal.SIGKILL)
                            except (ProcessLookupError, PermissionError):
                                pass
        while by_pid:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            try:  # what the fork left in its group (data-loader workers) goes with it
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            conn = by_pid.pop(pid, None)
            if conn is not None:
                by_conn.pop(conn, None)
                try:
                    conn.sendall(f"status {status}\n".encode())
                except OSError:
                    pass
                try:
                    sel.unregister(conn)
                except (KeyError, ValueError):
                    pass
                conn.close()
        if by_pid:
            last = time.monotonic()
        elif time.monotonic() - last > IDLE_S or not folder.is_dir():
            listener.close()
            try:
                os.unlink(sock_path)
            except OSError:
                pass
            return 0


if __name__ == "__main__":
    # through the importable module: the fork's `delegate` must see the IN_CHILD this one sets
    from harness.child import forkserver

    sys.exit(forkserver.serve(sys.argv[1], sys.argv[2]))
