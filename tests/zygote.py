"""``python train.py ...`` for the tests without paying the start-up each time: a fork server with the suite imported.

Every subprocess run of ``train.py``/``eval.py`` spends ~10-12 s of CPU importing torch, Lightning (torchmetrics,
torchvision, torch._dynamo), Hydra, timm and the suite before it does a second of work; the tests start ~50 such
processes. This module keeps one *zygote* per test process: a child Python that has imported all of that once and
has run no torch op (so OpenMP has started no thread pool: libgomp's pool does not survive ``fork`` -- a child of a
process that already ran a parallel region hangs in its first one). Each run is ``fork`` of the zygote, then the
script through ``runpy`` as ``__main__`` with the request's argv, cwd, environment and stdout/stderr files -- a real,
separate process: it can be signalled or SIGKILLed, its exit status is the script's, Lightning's DDP launcher starts
its other ranks from its ``sys.argv`` as usual, and nothing it does reaches the test process.

Not for what needs a fresh interpreter: variables read when torch/oneDNN load (``ATEN_CPU_CAPABILITY``,
``ONEDNN_MAX_CPU_ISA``: the AVX2-capped reruns), or a timing of the real command (``bench/``).
``TRANSFERRABLE_TEST_ZYGOTE=0`` falls back to plain subprocesses.
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
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.py", "eval.py")
# imported once by the zygote; what a run imports beyond these it imports itself
PRELOAD = ("torch", "lightning", "hydra", "omegaconf", "timm", "torchvision", "sklearn.svm", "sklearn.linear_model",
           "cv2", "wandb", "transferrable.run.runner", "transferrable.run.methods", "transferrable.run.report")
PACKAGES = ("engine", "lightning_modules", "datamodules", "models", "callbacks")


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


def _child(req: dict) -> None:
    """In the forked child: become ``python <argv>`` and never return."""
    code = 1
    try:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        import torch

        if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # what a fresh process would read when OpenMP loads
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
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
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def serve() -> None:
    _preload()
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing the zygote's modules print may corrupt the replies
    reply.write("ready\n")
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(req)
        reply.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


# -- the client (in the test process) ------------------------------------------------------------------------------

class _Zygote:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lock = threading.Lock()
        if self._line(timeout=300) != "ready":
            raise RuntimeError("the test zygote did not start")
        atexit.register(self.close)

    def _line(self, timeout: float | None) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the test zygote exited ({self.proc.wait()})")
        return line.strip()

    def run(self, argv: list[str], cwd: Path, env: dict, timeout: float | None) -> subprocess.CompletedProcess:
        with self.lock, tempfile.TemporaryDirectory(prefix="zygote-") as tmp:
            out, err = Path(tmp, "out"), Path(tmp, "err")
            self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "env": env, "out": str(out),
                                              "err": str(err)}) + "\n")
            self.proc.stdin.flush()
            pid = json.loads(self._line(timeout=60))["pid"]
            try:
                code = json.loads(self._line(timeout=timeout))["returncode"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._line(timeout=60)
                raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text()) from None
            return subprocess.CompletedProcess([sys.executable, *argv], code, out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_zygote: _Zygote | None = None


def run_script(argv: list[str], cwd: Path = ROOT, env: dict | None = None,
               timeout: float | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)``
    for ``argv[0]`` = train.py or eval.py, forked from the zygote (started on first use)."""
    global _zygote
    env = dict(os.environ if env is None else env)
    if os.environ.get("TRANSFERRABLE_TEST_ZYGOTE", "1") == "0" or Path(argv[0]).name not in SCRIPTS:
        return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    if _zygote is None or _zygote.proc.poll() is not None:
        _zygote = _Zygote()
    return _zygote.run([str(a) for a in argv], Path(cwd), env, timeout)


if __name__ == "__main__":
    serve()
