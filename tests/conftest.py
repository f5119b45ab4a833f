"""Shared fixtures: a tiny, learnable Fashion-MNIST-shaped IDX dataset and in-process Hydra configs.

Configs are composed in-process (as in lightning-hydra-template): ``compose(..., return_hydra_config=True)``,
then ``paths.*`` are pointed at ``tmp_path`` and ``HydraConfig`` is set so ``${hydra:...}`` resolves.
"""

from __future__ import annotations

import copy
import gzip
import os
import sys
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ["PROJECT_ROOT"] = str(ROOT)
os.environ.pop("TRANSFERRABLE_CACHE", None)  # tests must never touch the real source-representation cache
# Set before torch loads OpenMP: on a busy 2-core machine, spinning OpenMP threads make every op ~50x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _test_threads() -> int:
    """Torch threads per test process: TRANSFERRABLE_TEST_THREADS if set; under pytest-xdist the cores shared
    among the workers, at most 2 (2 workers on 2 cores: 1 each, not 4 threads on 2 cores); else 2."""
    if "TRANSFERRABLE_TEST_THREADS" in os.environ:
        return int(os.environ["TRANSFERRABLE_TEST_THREADS"])
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    return max(1, min(2, len(os.sched_getaffinity(0)) // workers)) if workers else 2


TEST_THREADS = _test_threads()
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # the same share for the subprocesses a test starts (train.py, DDP ranks, the AVX2-capped reruns)
    os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))
    os.environ.setdefault("TRANSFERRABLE_TEST_THREADS", str(TEST_THREADS))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

torch.set_num_threads(TEST_THREADS)


def _cache_interpolation_parses() -> None:
    """OmegaConf parses an interpolation string with its ANTLR grammar on every access and keeps no tree; the tests
    validate and compose the same configs thousands of times (the search tests: ~45% of their time was parsing).
    The trees are read-only to OmegaConf's resolver, so the same string's tree is reused (test processes only)."""
    import functools

    import omegaconf._utils
    import omegaconf.base
    import omegaconf.grammar_parser

    parse = functools.lru_cache(maxsize=16384)(omegaconf.grammar_parser.parse)
    omegaconf.base.parse = omegaconf._utils.parse = parse


def _cache_config_files() -> None:
    """Hydra reads and YAML-parses every file of a composition again on each ``compose`` (~40% of its time); the
    tests compose thousands of times. A file's parse is kept per path, size and mtime and handed out as a copy, so
    a test that writes or edits a config file still gets what is on disk (test processes only)."""
    from hydra._internal.core_plugins.file_config_source import FileConfigSource
    from hydra.plugins.config_source import ConfigResult

    load, parsed = FileConfigSource.load_config, {}

    def load_config(self, config_path: str) -> ConfigResult:
        full = os.path.realpath(os.path.join(self.path, self._normalize_file_name(config_path)))
        try:
            st = os.stat(full)
        except OSError:
            return load(self, config_path)  # Hydra's own error
        key = (self.path, config_path, full, st.st_size, st.st_mtime_ns)
        if key not in parsed:
            parsed[key] = load(self, config_path)
        r = parsed[key]
        return ConfigResult(config=copy.deepcopy(r.config), path=r.path, provider=r.provider, header=dict(r.header),
                            is_schema_source=r.is_schema_source)

    FileConfigSource.load_config = load_config


_cache_interpolation_parses()
_cache_config_files()

NUM_CLASSES = 10


# -- tiny IDX dataset ---------------------------------------------------------------------------
def write_idx_gz(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 array in the (gzipped) IDX format of (Fashion-)MNIST."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def class_templates(num_classes: int = NUM_CLASSES, seed: int = 1234) -> np.ndarray:
    """One smooth, left-right symmetric 28x28 pattern per class (so flips keep the class)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.0, 1.0, size=(num_classes, 7, 7))
    coarse = (coarse + coarse[:, :, ::-1]) / 2
    return np.kron(coarse, np.ones((4, 4)))  # num_classes x 28 x 28 in [0, 1]


def make_images(labels: np.ndarray, rng: np.random.Generator, noise: float = 45.0) -> np.ndarray:
    templates = class_templates()
    imgs = 30.0 + 190.0 * templates[labels] + rng.normal(0.0, noise, size=(len(labels), 28, 28))
    return np.clip(imgs, 0, 255).astype(np.uint8)


def make_fashion_mnist_fixture(directory: str | Path, n_train: int = 400, n_test: int = 200, seed: int = 0) -> Path:
    """Write ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` with class-dependent random images."""
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % NUM_CLASSES
        rng.shuffle(labels)
        write_idx_gz(directory / f"{prefix}-images-idx3-ubyte.gz", make_images(labels, rng))
        write_idx_gz(directory / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return directory


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    return make_fashion_mnist_fixture(tmp_path_factory.mktemp("fashion_mnist"))


# -- Hydra configs ------------------------------------------------------------------------------
def tiny_overrides(data_dir: str | Path) -> list[str]:
    """Overrides that make a train.yaml run tiny, quiet and CPU/fp32 on the IDX fixture."""
    return [
        "logger=none",
        "hardware=cpu",
        # a source a test pretrains is the tiny Fashion-MNIST-shaped fixture's, never the 61k-image default
        "source_dataset=fashion_mnist",
        "trainer.precision=32-true",
        f"dataset.data_dir={data_dir}",
        "dataset.batch_size=32",
        "dataset.eval_batch_size=100",
        "dataset.augment=none",
        "trainer.max_epochs=1",
        "++trainer.limit_train_batches=2",
        "++trainer.limit_val_batches=1",
        "++trainer.limit_test_batches=1",
        "trainer.enable_model_summary=false",
        "++trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "~callbacks.model_summary",
        "~callbacks.lr_monitor",
        "seed=0",
    ]


_COMPOSED: OrderedDict[tuple, DictConfig] = OrderedDict()  # this worker's last composes (a compose takes ~0.5 s)


def compose_train(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """A fresh copy of ``config_name`` composed with ``overrides``; the same composition asked again (the schema,
    search and documented-command tests ask many twice) is copied from this worker's cache instead of recomposed.
    A compose that raises is not cached: it raises each time."""
    key = (config_name, tuple(overrides or ()), os.getcwd())
    if key not in _COMPOSED:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            _COMPOSED[key] = compose(config_name=config_name, return_hydra_config=True, overrides=list(key[1]))
        if len(_COMPOSED) > 256:
            _COMPOSED.popitem(last=False)
    _COMPOSED.move_to_end(key)
    return copy.deepcopy(_COMPOSED[key])


def point_paths_at(cfg: DictConfig, tmp_path: Path, cache_dir: Path | None = None) -> DictConfig:
    """Send every output of a composed config into ``tmp_path`` and make ``${hydra:...}`` resolvable."""
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.cache_dir = str(cache_dir or tmp_path / "cache")
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.job.num = 0  # set by Hydra at run time; build_model resolves the whole config (sweep.subdir)
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def make_cfg(fmnist_dir, tmp_path):
    """``make_cfg(*overrides, out=subdir)``: a tiny train.yaml config writing into ``tmp_path/out``."""

    def _make(*overrides: str, out: str = "run", cache_dir: Path | None = None) -> DictConfig:
        cfg = compose_train([*tiny_overrides(fmnist_dir), *overrides])
        return point_paths_at(cfg, tmp_path / out, cache_dir or tmp_path / "cache")

    return _make


@pytest.fixture
def cfg_train(make_cfg) -> DictConfig:
    return make_cfg()


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


# -- pytest-xdist -------------------------------------------------------------------------------
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Tests sharing a module- or session-scoped fixture of a test file (a trained run, generated data) go to
    one xdist worker together (``--dist loadgroup``): the fixture is built once, not once per worker."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = [d[-1] for d in info.name2fixturedefs.values()] if info else []
        shared = sorted({d.func.__module__ for d in defs
                         if d.scope in ("module", "session") and d.func.__module__.startswith("test_")})
        if shared and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(shared[0]))
    yield  # xdist's own hook appends "@<group>" to the node ids it schedules by
    if getattr(config.option, "loadgroup", False):
        _group_suffix_fallback(items)


def _group_suffix_fallback(items) -> None:
    """pytest 9.2 keeps a node's id in ``_id``; pytest-xdist 3.8 still writes ``_nodeid``, so its "@<group>"
    suffix is lost and each group is split as by ``--dist load``. Add the suffix where it is missing (the same
    name and test as xdist's: the text after the last "@", when that comes after the last "]")."""
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and item.nodeid.rfind("@") <= item.nodeid.rfind("]"):
            from _pytest.nodeid import coerce_node_id  # only where the suffix was lost: pytest >= 9.2

            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")
