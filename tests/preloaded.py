"""`python SCRIPT ARGS...` for the tests without paying the interpreter's start-up each time.

A train.py run on the digits spends most of its seconds importing torch, timm (and through it torchvision and
torch._dynamo), scikit-learn and Accelerate. `command(env)` gives the command line and environment to launch
instead, `python tests/preloaded.py run SCRIPT ARGS...`: a stub that imports nothing heavy and hands its working
directory, environment, argv and stdin/stdout/stderr to a server (one per pytest worker, started on first use) that
has imported those modules once and forks a child per command. The child becomes `python SCRIPT ARGS` there and
exits as the interpreter would (its exit code, or a traceback and exit 1; the exit handlers run, the module teardown
is skipped); the stub exits with the child's code, or dies of the signal that killed it, and passes the signals it
gets on to the child (a stub killed outright takes its child with it). So a fail point's SIGKILL, an error's exit 2,
resume equality and torchrun's workers (the stub is what torchrun starts) run on processes of their own, as before.
The server never runs a torch operation, so the children fork from a single-threaded interpreter.

A command the server cannot reproduce exactly (another OMP_NUM_THREADS, which the OpenMP runtime reads when torch is
loaded) makes the stub exec the real interpreter instead.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOCKET_ENV = "LT_TESTS_PRELOADED"  # the server's socket, for the stubs
THREADS = "1"  # OMP_NUM_THREADS of the server and so of every child
PRELOAD = ("torch", "timm", "accelerate", "sklearn.datasets", "yaml", "torch.distributed.run", "lt_recipes.cli",
           "lt_recipes.engine")

_server: tuple[subprocess.Popen, str] | None = None


def command(env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command prefix that stands for `sys.executable` (append SCRIPT ARGS...) and `env` with the server's
    socket in it; starts the server on first use."""
    global _server
    if _server is None or _server[0].poll() is not None:
        import atexit
        import shutil
        import tempfile

        # a short folder: a socket's path must stay under 108 bytes, which a long TMPDIR can pass
        folder = tempfile.mkdtemp(prefix="lt-preloaded-", dir="/tmp" if os.path.isdir("/tmp") else None)
        atexit.register(shutil.rmtree, folder, True)
        path = os.path.join(folder, "socket")
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", path], cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": THREADS}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout.readline() == b"ready\n", "the preloaded interpreter did not start"
        atexit.register(proc.kill)
        _server = proc, path
    return [sys.executable, os.path.abspath(__file__), "run"], {**env, SOCKET_ENV: _server[1]}


def _stub(argv: list[str]) -> None:
    """`python ARGV` (SCRIPT ARGS, -m MODULE ARGS or -c CODE ARGS) through the server: this process's directory,
    environment and stdio, its exit code."""
    if os.environ.get("OMP_NUM_THREADS") != THREADS or not os.environ.get(SOCKET_ENV):
        os.execv(sys.executable, [sys.executable, *argv])
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(os.environ[SOCKET_ENV])
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                          "unbuffered": sys.stdout.write_through}).encode()  # python -u
    message = len(request).to_bytes(8, "big") + request
    conn.sendall(message[socket.send_fds(conn, [message], [0, 1, 2]):])
    answers = conn.makefile("rb")
    pid = int(answers.readline())
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda s, _: os.kill(pid, s))
    code = int(answers.readline())
    if code < 0:  # killed by a signal: die of it too
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # the only two without a handler
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


def _child(request: dict, fds: list[int]) -> None:
    """In the forked child: become `python ARGV` in the stub's directory, environment and stdio; never returns."""
    for fd, received in enumerate(fds):
        os.dup2(received, fd)
        os.close(received)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    # python SCRIPT, python -m MODULE, python -c CODE: sys.argv and sys.path[0] as the interpreter sets them
    sys.argv = ["-c", *argv[2:]] if argv[0] == "-c" else argv[1:] if argv[0] == "-m" else list(argv)
    first = os.getcwd() if argv[0] == "-m" else "" if argv[0] == "-c" else os.path.dirname(os.path.abspath(argv[0]))
    del sys.path[0]  # the server's (the repository)
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.path[:0] = [first, *extra]
    if request["unbuffered"]:  # python -u (torchrun starts its workers so): stdout and stderr written through
        import io

        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True, errors="backslashreplace")
    import atexit
    import runpy
    import threading

    try:
        if argv[0] == "-c":
            main = sys.modules["__main__"] = type(sys)("__main__")
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        elif argv[0] == "-m":
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as stop:  # as the interpreter reads it: None is 0, a message is printed with exit 1
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    # the interpreter's exit without its module teardown, which in a fork copies the preloaded heap page by page
    # (seconds per run): wait for non-daemon threads, run the exit handlers (logging's flush among them), flush
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code & 0xFF)


def _serve(path: str) -> None:
    """Accept stubs on `path`; fork a child for each; answer its pid, then its exit code (negative: the signal).
    A stub that goes away first (killed) takes its child with it."""
    import importlib
    import select

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # a module moved: the child imports what it needs itself
            pass
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(16)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    children: dict[int, socket.socket] = {}  # pid -> its stub's connection
    parent = os.getppid()
    while os.getppid() == parent:  # until the pytest worker that started it is gone
        ready, _, _ = select.select([listener, *children.values()], [], [], 0.05)
        for pid, conn in list(children.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                try:
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                conn.close()
                del children[pid]
            elif conn in ready:  # the stub closed its end (it was killed): so is its child, with its own children
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if listener in ready:
            conn, _ = listener.accept()
            head, fds, _, _ = socket.recv_fds(conn, 8, 3)
            size, body = int.from_bytes(head, "big"), b""
            while len(head) == 8 and len(body) < size:
                chunk = conn.recv(size - len(body))
                if not chunk:
                    break
                body += chunk
            if len(head) < 8 or len(body) < size or len(fds) != 3:  # a stub that died while asking
                for fd in fds:
                    os.close(fd)
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                os.setpgid(0, 0)  # a process group of its own, which a killed stub's takes down whole
                listener.close()
                for other in children.values():
                    other.close()
                conn.close()
                _child(json.loads(body), fds)
            for fd in fds:
                os.close(fd)
            try:
                conn.sendall(f"{pid}\n".encode())
            except OSError:  # its stub is gone: the loop above ends the child
                pass
            children[pid] = conn


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        sys.path[0] = ROOT
        _serve(sys.argv[2])
    elif sys.argv[1] == "run":
        _stub(sys.argv[2:])
