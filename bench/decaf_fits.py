"""``decaf_fits``: DeCAF classifier fits per second, the torch solver (``decaf.solver=torch``,
models/torch_linear.py) against scikit-learn (``decaf.solver=sklearn``) on the same features, in the same run.

One *fit* is what task=decaf does per (feature, classifier, split): ``fit_cross_validated`` -- every C of the task's
grid fitted on the 25/5 subsplit and scored, the best refit on all 30 per class (conf/task/decaf.yaml's C_grid,
val_fraction, max_iter; dropout copies 4). Features: the Caltech-role shape, ``classes`` x ``per_class`` rows of
``dims`` non-negative (post-ReLU-like) class blobs on a common offset, scaled to unit mean norm (at 1024 dims
they are easy: ~99% test accuracy; the timing is what this entry is for, tests/test_torch_linear.py checks the
accuracies on harder ones) (params: classes=101 per_class=30 dims=1024 kinds=logreg,svm). On a tiny (--quick)
problem scikit-learn is faster: torch's per-iteration overhead dominates there. Both solvers on one BLAS/torch thread, as the task's
``decaf.fit_threads: 1``. The ratio is the speed-up; target >= 6 (the 101-class table: ~1 h -> <= 10 min).
The test accuracies of both are logged beside the timings (they should agree within noise).
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf
from threadpoolctl import threadpool_limits

from bench.registry import Context, Figure, Stats, Target, benchmark
from bench.suite import CONF_DIR
from bench.timing import interleave, per_second


def blob_features(classes: int, per_class: int, dims: int, seed: int = 0, noise_seed: int | None = None):
    """(X, y): overlapping non-negative class blobs, rows scaled to unit mean L2 norm."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dims)).astype(np.float32)
    noise = np.random.default_rng(seed if noise_seed is None else noise_seed)
    y = np.repeat(np.arange(classes), per_class)
    X = np.maximum(0.25 * means[y] + noise.normal(size=(len(y), dims)).astype(np.float32) + 0.3, 0.0)
    return X / np.linalg.norm(X, axis=1).mean(), y


@benchmark("decaf_fits")
def decaf_fits(ctx: Context) -> list[Figure]:
    from models.linear_classifiers import ClassifierSpec, fit_cross_validated, mean_class_accuracy

    node = OmegaConf.load(CONF_DIR / "task" / "decaf.yaml").decaf
    classes, per_class, dims = (8, 12, 16) if ctx.quick else (
        ctx.param("classes", 101), ctx.param("per_class", 30), ctx.param("dims", 1024))
    kinds = ctx.param("kinds", "logreg,svm").split(",")
    X, y = blob_features(classes, per_class, dims)
    X_test, y_test = blob_features(classes, per_class, dims, noise_seed=1)
    grid = [float(c) for c in node.C_grid]
    figures = []
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            for kind in kinds:
                spec = ClassifierSpec.parse(kind)
                acc = {}

                def fit(solver, spec=spec, acc=acc):
                    clf, C, _ = fit_cross_validated(spec, X, y, grid, float(node.val_fraction), seed=0,
                                                    max_iter=int(node.max_iter), solver=solver)
                    acc[solver] = (mean_class_accuracy(y_test, clf.predict(X_test)), C)

                runs = {s: (lambda s=s: per_second(1, lambda: fit(s))) for s in ("torch", "sklearn")}
                rates = interleave(runs, ctx.repeats)
                shape = f"{kind} {classes} classes x {per_class}/class x {dims} dims"
                ctx.log(f"{shape}: torch {np.median(rates['torch']):.3g} fits/s, sklearn "
                        f"{np.median(rates['sklearn']):.3g}; test acc (C) torch {acc['torch'][0]:.4f} "
                        f"({acc['torch'][1]:g}), sklearn {acc['sklearn'][0]:.4f} ({acc['sklearn'][1]:g})")
                figures.append(Figure(
                    f"DeCAF cross-validated fit {shape}", Stats(rates["torch"]), "fits/s",
                    reference=Stats(rates["sklearn"]), reference_name="scikit-learn (decaf.solver=sklearn)",
                    target=Target(">=", 6.0),
                    note=f"C grid {grid} + refit, 1 thread; test mean-class acc torch {acc['torch'][0]:.4f} "
                         f"(C={acc['torch'][1]:g}) vs sklearn {acc['sklearn'][0]:.4f} (C={acc['sklearn'][1]:g})",
                ))
    finally:
        torch.set_num_threads(before)
    return figures
