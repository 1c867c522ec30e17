"""`python SCRIPT ARGS...` for the tests without paying the interpreter's start-up each time.

A train.py run on the digits spends most of its seconds importing torch, timm (and through it torchvision and
torch._dynamo), scikit-learn and Accelerate. `run_script` hands the command to a server process (one per pytest
worker, started on first use) that has imported them once and forks a child per command: the child takes the
command's working directory, environment, argv and stdin/stdout/stderr, runs the script as `__main__` and exits as
the interpreter would (its exit code, a traceback and exit 1, or the signal that killed it, as a negative
returncode; the exit handlers run, the module teardown is skipped). So a fail point's SIGKILL, an error's exit 2
and resume equality are tested on a process of their own, as before. The server never runs a torch operation, so
the children fork from a single-threaded interpreter.

Commands the server cannot reproduce exactly (another OMP_NUM_THREADS, which the OpenMP runtime reads when torch is
loaded, or another interpreter) run as plain subprocesses.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = "1"  # OMP_NUM_THREADS of the server and so of every child
PRELOAD = ("torch", "timm", "accelerate", "sklearn.datasets", "yaml", "lt_recipes.cli", "lt_recipes.engine")

_server: subprocess.Popen | None = None


def _start() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        env = {**os.environ, "OMP_NUM_THREADS": THREADS}
        _server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"], cwd=ROOT, env=env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        atexit.register(_server.kill)
    return _server


def run_script(argv: list[str], cwd: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)`,
    run by a fork of the preloaded server where it can be."""
    if env.get("OMP_NUM_THREADS") != THREADS:
        return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    server = _start()
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        request = {"argv": [str(a) for a in argv], "cwd": str(cwd), "env": dict(env), "out": out, "err": err}
        server.stdin.write(json.dumps(request).encode() + b"\n")
        server.stdin.flush()
        pid = int(server.stdout.readline())
        ready, _, _ = select.select([server.stdout], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            server.stdout.readline()
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout)
        returncode = int(server.stdout.readline())
        with open(out) as o, open(err) as e:
            return subprocess.CompletedProcess([sys.executable, *argv], returncode, o.read(), e.read())


def _child(request: dict) -> None:
    """In the forked child: become `python ARGV` in its directory and environment; never returns."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], os.O_WRONLY | os.O_CREAT),
                            (2, request["err"], os.O_WRONLY | os.O_CREAT)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    script = os.path.abspath(request["argv"][0])
    sys.argv = [request["argv"][0], *request["argv"][1:]]
    sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` puts the script's folder first
    import atexit
    import runpy
    import threading

    try:
        runpy.run_path(script, run_name="__main__")
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


def _serve() -> None:
    """Read one JSON request a line; for each, fork a child that runs it, answer its pid and then its returncode."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # a module moved: the child imports what it needs itself
            pass
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    for line in requests:
        request = json.loads(line)
        answers.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        answers.write(f"{pid}\n".encode())
        answers.flush()
        _, status = os.waitpid(pid, 0)
        answers.write(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        answers.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    sys.path[0] = ROOT
    _serve()
