"""``python train.py ...`` for the tests without paying the start-up each time: a fork server with the suite imported.

Every subprocess run of ``train.py``/``eval.py`` spends ~10-12 s of CPU importing torch, Lightning (torchmetrics,
torchvision, torch._dynamo), Hydra, timm and the suite before it does a second of work; the tests start ~60 such
processes, DDP's second ranks included. This module keeps one *zygote* per test process: a child Python that has
imported all of that once and has run no torch op (so OpenMP has started no thread pool: libgomp's pool does not
survive ``fork`` -- a child of a process that already ran a parallel region hangs in its first one).

Each run is a request on the zygote's Unix socket carrying argv, cwd, environment and the caller's stdin/stdout/stderr
file descriptors. A handler process forked for the request forks the run itself -- the script through ``runpy`` as
``__main__`` -- waits for it and reports its pid and exit status. So runs are real, separate processes: they can be
signalled or SIGKILLed, their exit status is the script's, several run at once, and nothing they do reaches the test
process. Inside a run, Lightning's DDP launcher starts the other ranks through the zygote too (``_LAUNCHERS``): the
same command, environment and output files it would give ``subprocess.Popen``.

Not for what needs a fresh interpreter: variables read when torch/oneDNN load (``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA``: the AVX2-capped reruns), or a timing of the real command (``bench/``).
``TRANSFERRABLE_TEST_ZYGOTE=0`` falls back to plain subprocesses.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.py", "eval.py")
# imported once by the zygote; what a run imports beyond these it imports itself
PRELOAD = ("torch", "lightning", "hydra", "omegaconf", "timm", "torchvision", "sklearn.svm", "sklearn.linear_model",
           "cv2", "wandb", "transferrable.run.runner", "transferrable.run.methods", "transferrable.run.report")
PACKAGES = ("engine", "lightning_modules", "datamodules", "models", "callbacks")
# Lightning's modules that start a DDP run's other ranks with ``subprocess.Popen([python, script, ...])``
_LAUNCHERS = ("lightning.fabric.strategies.launchers.subprocess_script",
              "lightning.pytorch.strategies.launchers.subprocess_script")

_socket_path: str | None = None  # the zygote's socket: set in the zygote, inherited by every run


# -- the zygote (runs as ``python tests/zygote.py``) ---------------------------------------------------------------

_BASE_PATH = sys.path[1:]  # sys.path without the zygote's own folder (tests/), as a fresh ``python <script>`` has it


def _preload() -> None:
    import importlib
    import pkgutil

    sys.path.insert(0, str(ROOT))
    for name in PRELOAD:
        importlib.import_module(name)
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, f"{package}."):
            try:
                importlib.import_module(info.name)
            except Exception:  # noqa: BLE001 - an optional extra missing: the run imports (and reports) it itself
                pass


class _ViaZygote:
    """The ``subprocess`` module as a Lightning launcher sees it: ``Popen`` of ``[python, train.py|eval.py, ...]``
    forks from the zygote; anything else is the real ``subprocess``."""

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(command, env=None, cwd=None, **kwargs):  # noqa: N802 - subprocess's name
        if kwargs or len(command) < 2 or command[0] != sys.executable or Path(command[1]).name not in SCRIPTS:
            return subprocess.Popen(command, env=env, cwd=cwd, **kwargs)
        proc = ZygoteProcess(list(command[1:]), Path(cwd or os.getcwd()), dict(os.environ if env is None else env),
                             (0, 1, 2))
        _spawned.append(proc)
        return proc


_spawned: list[ZygoteProcess] = []  # in a run: the ranks it started, waited for before it exits (as a pipe would)


def _child(req: dict, fds: list[int]) -> None:
    """In the forked run: become ``python <argv>`` and never return."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        import torch

        if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # what a fresh process would read when OpenMP loads
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        import importlib

        for name in _LAUNCHERS:
            importlib.import_module(name).subprocess = _ViaZygote()
        sys.argv = list(req["argv"])
        sys.path[:] = [str(Path(req["argv"][0]).resolve().parent), *_BASE_PATH]
        import runpy

        try:
            runpy.run_path(req["argv"][0], run_name="__main__")
            code = 0
        except SystemExit as done:
            if done.code is None or isinstance(done.code, int):
                code = done.code or 0
            else:
                print(done.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - what an uncaught exception does to a script: traceback, exit 1
            import traceback

            traceback.print_exc()
        atexit._run_exitfuncs()
        for proc in _spawned:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _handle(conn: socket.socket) -> None:
    """In a handler forked per request: fork the run, report its pid, wait, report its exit status."""
    req, fds = _receive(conn)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _child(req, fds)
    for fd in fds:
        os.close(fd)
    _reply(conn, {"pid": pid})
    _, status = os.waitpid(pid, 0)
    _reply(conn, {"returncode": os.waitstatus_to_exitcode(status)})


def _reply(conn: socket.socket, message: dict) -> None:
    try:
        conn.sendall(json.dumps(message).encode() + b"\n")
    except OSError:  # the caller went away (a rank whose parent had exited): the run goes on to its end
        pass


def serve(path: str) -> None:
    global _socket_path
    _preload()
    _socket_path = path
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the handlers are reaped by the kernel
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing the zygote's modules print may corrupt the reply
    reply.write("ready\n")
    while True:
        ready, _, _ = select.select([server, sys.stdin], [], [])
        if sys.stdin in ready and not sys.stdin.readline():
            break  # the test process closed our stdin (or died): stop serving
        if server in ready:
            conn, _ = server.accept()
            if os.fork() == 0:
                server.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                try:
                    _handle(conn)
                finally:
                    os._exit(0)
            conn.close()


# -- the wire: one length-prefixed JSON request with three file descriptors, then lines back ----------------------

def _send(conn: socket.socket, req: dict, fds: tuple[int, ...]) -> None:
    body = json.dumps(req).encode()
    socket.send_fds(conn, [struct.pack("!Q", len(body)) + body], list(fds))


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    size = struct.unpack("!Q", data[:8])[0]
    body = data[8:]
    while len(body) < size:
        body += conn.recv(size - len(body))
    return json.loads(body), list(fds)


class ZygoteProcess:
    """A run forked from the zygote, with the part of ``subprocess.Popen``'s interface that the tests and
    Lightning's launcher use (``pid``, ``poll``, ``wait``, ``send_signal``, ``terminate``, ``kill``, ``returncode``)."""

    def __init__(self, argv: list[str], cwd: Path, env: dict, fds: tuple[int, int, int]) -> None:
        self.args = [sys.executable, *argv]
        self.returncode: int | None = None
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(_socket_path)
        self._buffer = b""
        self._lock = threading.Lock()  # Lightning's observer thread polls while the run waits at its end
        _send(self._conn, {"argv": argv, "cwd": str(cwd), "env": env}, fds)
        self.pid = json.loads(self._line(60))["pid"]

    def _line(self, timeout: float | None) -> str:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._conn], [], [], left)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            chunk = self._conn.recv(4096)
            if not chunk:
                raise RuntimeError("the test zygote's handler exited without a reply")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def wait(self, timeout: float | None = None) -> int:
        with self._lock:
            if self.returncode is None:
                self.returncode = json.loads(self._line(timeout))["returncode"]
                self._conn.close()
            return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(timeout=0)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        """For a run started by ``popen_script``: wait, then its merged output."""
        self.wait(timeout)
        with self.output:
            return _read(self.output), None


# -- the client (in the test process) ------------------------------------------------------------------------------

class _Zygote:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="zygote-")
        self.path = os.path.join(self.dir, "socket")
        self.proc = subprocess.Popen([sys.executable, __file__, self.path], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        if not select.select([self.proc.stdout], [], [], 300)[0] or self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the test zygote did not start ({self.proc.poll()})")
        atexit.register(self.close)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)  # the socket's folder


_zygote: _Zygote | None = None


def _use_zygote(argv: list[str]) -> bool:
    return os.environ.get("TRANSFERRABLE_TEST_ZYGOTE", "1") != "0" and Path(argv[0]).name in SCRIPTS


def start_script(argv: list[str], cwd: Path, env: dict, stdout: int, stderr: int) -> ZygoteProcess:
    """``subprocess.Popen([sys.executable, *argv], ...)`` for ``argv[0]`` = train.py or eval.py, writing to the file
    descriptors ``stdout``/``stderr``, forked from this process's zygote (started on first use)."""
    global _zygote, _socket_path
    if _zygote is None or _zygote.proc.poll() is not None:
        _zygote = _Zygote()
    _socket_path = _zygote.path
    with open(os.devnull, "rb") as null:
        return ZygoteProcess([str(a) for a in argv], Path(cwd), dict(env), (null.fileno(), stdout, stderr))


def run_script(argv: list[str], cwd: Path = ROOT, env: dict | None = None,
               timeout: float | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)``,
    through the zygote for train.py and eval.py."""
    env = dict(os.environ if env is None else env)
    if not _use_zygote(argv):
        return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = start_script(argv, cwd, env, out.fileno(), err.fileno())
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(60)
            raise subprocess.TimeoutExpired(proc.args, timeout, _read(out), _read(err)) from None
        return subprocess.CompletedProcess(proc.args, code, _read(out), _read(err))


def popen_script(argv: list[str], cwd: Path, env: dict):
    """``subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=PIPE, stderr=STDOUT, text=True)`` for
    runs that must overlap: ``communicate(timeout)`` gives ``(output, None)``."""
    if not _use_zygote(argv):
        return subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    out = tempfile.TemporaryFile()
    proc = start_script(argv, cwd, env, out.fileno(), out.fileno())
    proc.output = out
    return proc


def _read(file) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")


if __name__ == "__main__":
    serve(sys.argv[1])
