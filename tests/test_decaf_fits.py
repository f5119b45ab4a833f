"""DeCAF's classifier fits run in parallel (``decaf.fit_workers``): the same results, in the same order."""

from __future__ import annotations

import numpy as np
from test_decaf import _pool

from models.linear_classifiers import ClassifierSpec, FeatureDropout


def test_parallel_fits_give_the_one_worker_results_in_the_same_order(monkeypatch):
    """run_protocol's fits run on ``fit_workers`` threads: the same accuracies, chosen C and order as one worker,
    and the fits do overlap (a second fit starts before the first returns)."""
    import threading
    import time

    import engine.decaf.protocol as protocol

    rng = np.random.default_rng(0)
    pool = _pool([12, 12, 12])
    feats = {name: (rng.normal(size=(len(pool), 6)) + pool.labels[:, None] * scale).astype(np.float32)
             for name, scale in (("a", 1.0), ("b", 0.3))}
    kw = dict(features=["a", "b"], specs=[ClassifierSpec("logreg"), ClassifierSpec("svm", dropout=True)],
              shots=[2, 5], split_seeds=[0, 1], C_grid=[0.1, 10.0], val_fraction=0.2, default_C=1.0, cv_at="largest",
              dropout=FeatureDropout(0.5, 2), max_iter=200, pool="all", max_images=None, main="a/logreg", tsne={},
              fit_threads=1, plot=False, solver="torch")
    one = protocol.run_protocol(protocol.Protocol(**kw, fit_workers=1), pool, feats)
    fit_eval, running, overlapped = protocol.fit_eval, [0], threading.Event()
    lock = threading.Lock()

    def watched(*args, **kwargs):
        with lock:
            running[0] += 1
            if running[0] > 1:
                overlapped.set()
        time.sleep(0.02)
        try:
            return fit_eval(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(protocol, "fit_eval", watched)
    three = protocol.run_protocol(protocol.Protocol(**kw, fit_workers=3), pool, feats)
    assert list(three) == list(one) and len(one) == 2 * 2 * 2  # feature x classifier x shots, in one order
    for key in one:
        np.testing.assert_equal(three[key], one[key])  # accuracies, C and validation scores, split by split
    assert overlapped.is_set()


def test_the_longest_fits_start_first_and_results_keep_their_order(monkeypatch):
    """The jobs are submitted longest first (dropout copies x feature width, the SVM x3), so that no long fit starts
    last while the other workers idle; the results come back in the protocol's own order all the same."""
    import engine.decaf.protocol as protocol

    rng = np.random.default_rng(0)
    pool = _pool([8, 8, 8])
    feats = {"narrow": rng.normal(size=(len(pool), 4)).astype(np.float32),
             "wide": rng.normal(size=(len(pool), 16)).astype(np.float32)}
    kw = dict(features=["narrow", "wide"], specs=[ClassifierSpec("logreg"), ClassifierSpec("svm", dropout=True)],
              shots=[3], split_seeds=[0], C_grid=[1.0], val_fraction=0.2, default_C=1.0, cv_at="largest",
              dropout=FeatureDropout(0.5, 2), max_iter=50, pool="all", max_images=None, main="wide/logreg", tsne={},
              fit_threads=1, plot=False, solver="torch", fit_workers=1)
    started, fit_eval = [], protocol.fit_eval

    def recorded(p, spec, X_train, *args, **kwargs):
        started.append((X_train.shape[1], spec.name))
        return fit_eval(p, spec, X_train, *args, **kwargs)

    monkeypatch.setattr(protocol, "fit_eval", recorded)
    results = protocol.run_protocol(protocol.Protocol(**kw), pool, feats)
    # costs: wide svm_dropout 16*2*3=96, narrow svm_dropout 24, wide logreg 16, narrow logreg 4
    assert started == [(16, "svm_dropout"), (4, "svm_dropout"), (16, "logreg"), (4, "logreg")]
    assert list(results) == [("narrow", "logreg", 3), ("narrow", "svm_dropout", 3), ("wide", "logreg", 3),
                             ("wide", "svm_dropout", 3)]
