"""``ddp_scaling``: DeCAF feature extraction on 1 vs 2 DDP CPU processes (``hardware=ddp_cpu``), in the same run.

Each sample is one ``python train.py task=decaf`` on Fashion-MNIST's test images (or a generated stand-in),
extraction-dominated (fc6+fc7, one split, logistic regression at one C); the figure is images per second of the
whole run (start-up, extraction, gather, classifiers). On a 2-core machine the ceiling is ~1x: one process already
runs 2 threads, two processes run 1 each, so this measures the overhead of sharding, not a speed-up; on a node
with N GPUs or many cores the same command spreads extraction over N processes.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import ROOT
from bench.registry import Context, Figure, Stats, benchmark
from bench.suite import FASHION_MNIST_DIR, fashion_mnist_fixture

ARGS = ["task=decaf", "dataset=fashion_mnist", "logger=none", "backbone.weights=null", "decaf.cache=false",
        "decaf.features=[fc6,fc7]", "decaf.classifiers=[logreg]", "decaf.C_grid=[1]", "decaf.splits=1",
        "decaf.train_per_class=5", "decaf.tsne.enabled=false", "callbacks.progress_bar.refresh_rate=0",
        "trainer.enable_model_summary=false", "dataset.eval_batch_size=500"]


def _run(extra: list[str], out: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "train.py", *ARGS, f"hydra.run.dir={out}", *extra], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"train.py {' '.join(extra)} exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return time.perf_counter() - t0


@benchmark("ddp_scaling")
def ddp_scaling(ctx: Context) -> list[Figure]:
    images = 400 if ctx.quick else ctx.param("images", 10000)
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        data = FASHION_MNIST_DIR
        if ctx.quick or not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
            (Path(tmp) / "fm").mkdir()
            data = fashion_mnist_fixture(Path(tmp) / "fm", n_train=200, n_test=images)
        common = [f"dataset.data_dir={data}", f"decaf.max_images={images}"]
        rates: dict[str, list[float]] = {"1": [], "2": []}
        for i in range(ctx.repeats):  # interleaved, so drift hits both alike
            for n in ("1", "2"):
                extra = ["hardware=ddp_cpu", "trainer.devices=2"] if n == "2" else []
                rates[n].append(images / _run([*common, *extra], Path(tmp) / f"r{n}-{i}"))
    return [Figure(
        f"DeCAF run (fc6+fc7 extraction of {images} images + classifiers), 2 DDP CPU processes",
        Stats(rates["2"]), "images/s", reference=Stats(rates["1"]), reference_name="1 process, same run",
        note="end-to-end wall time incl. start-up; ceiling ~1x on 2 cores (1 process already uses both)",
    )]
