"""Whole runs in-process (runner.train / evaluate_checkpoint / report) plus one end-to-end CLI smoke test."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, compose_train, point_paths_at, tiny_overrides
from omegaconf import open_dict
from zygote import run_script

import transferrable.run.runner as runner
import transferrable.run.source as source
from models.backbones import CaffeNetMini

# caffenet_mini narrow enough to learn the fixture in a few seconds on 2 cores
MINI = ["backbone.widths=[16,32,32,32,32]", "backbone.fc_dim=64"]


def _spy_build_model(monkeypatch) -> list:
    """Record every LightningModule runner.train builds (with a copy of its initial weights)."""
    built = []
    real = runner.build_model

    def spy(cfg, num_classes):
        model = real(cfg, num_classes)
        built.append((model, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return model

    monkeypatch.setattr(runner, "build_model", spy)
    return built


# -- every backbone trains ----------------------------------------------------------------------
BACKBONES = {
    "caffenet_mini": ["backbone.input_size=32"],
    "alexnet": ["backbone.input_size=64"],  # AlexNet's 11x11/4 stem needs more than 32 px
    "vgg16": ["backbone.input_size=32", "backbone.pool5_size=1", "backbone.fc_dim=64"],
    "resnet18": ["backbone.input_size=32", "backbone.fc_dim=64"],
    "resnet50": ["backbone.input_size=32", "backbone.fc_dim=64"],
}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_fast_dev_run_every_backbone(name, make_cfg, monkeypatch):
    built = _spy_build_model(monkeypatch)
    cfg = make_cfg(f"backbone={name}", *BACKBONES[name], "++trainer.fast_dev_run=true",
                   "dataset.batch_size=4", "dataset.eval_batch_size=4")
    metrics = runner.train(cfg)

    (model, init), = built
    assert model.head.out_features == 10
    assert model.head.in_features == model.backbone.feature_dim("fc7")
    # one optimiser step happened on the backbone and the head
    for key in ("backbone.stages.conv1.0.weight", "head.weight"):
        assert not torch.equal(model.state_dict()[key], init[key]), key
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["test/loss"])
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert abs(metrics["test/loss"] - math.log(10)) < 2.5  # an untrained 10-way head is near chance
    assert json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]
    assert "test_checkpoint" not in metrics  # fast_dev_run writes no checkpoint


# -- a short real training run, shared by the tests that need a trained checkpoint --------------
@pytest.fixture(scope="module")
def trained_run(fmnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    cfg = compose_train([*tiny_overrides(fmnist_dir), *MINI, "trainer.max_epochs=3", "trainer.limit_train_batches=null",
                         "trainer.limit_val_batches=null", "trainer.limit_test_batches=null"])
    point_paths_at(cfg, out)
    metrics = runner.train(cfg)
    return cfg, metrics


def test_short_training_beats_chance(trained_run):
    cfg, metrics = trained_run
    # 10 balanced classes (chance 0.1); 200 held-out test images
    assert metrics["test/acc"] >= 0.5, metrics
    assert metrics["test/mean_class_acc"] >= 0.5
    assert metrics["test/loss"] < math.log(10) - 0.5
    assert metrics["val/acc"] >= 0.4


def test_metrics_json_and_checkpoints(trained_run):
    cfg, metrics = trained_run
    out = Path(cfg.paths.output_dir)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["test/acc"] == pytest.approx(metrics["test/acc"])
    assert {"test/acc", "test/loss", "test/mean_class_acc", "val/acc", "train/loss"} <= set(on_disk)
    best = Path(on_disk["test_checkpoint"])
    assert best.parent == out / "checkpoints" and best.is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    blob = torch.load(best, map_location="cpu", weights_only=True)  # plain values only
    assert blob["backbone_arch"] == "caffenet_mini"
    assert "run_config_yaml" in blob
    cb = next(v for k, v in blob["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert cb["monitor"] == "val/acc"  # the task's monitor, not callbacks/default.yaml's val/loss


def test_lightning_checkpoint_as_backbone_weights(trained_run):
    cfg, metrics = trained_run
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    bb = CaffeNetMini(32, widths=[16, 32, 32, 32, 32], fc_dim=64, weights=str(ckpt))
    own = bb.state_dict()
    assert own and all(torch.equal(v, state[f"backbone.{k}"]) for k, v in own.items())


def test_evaluate_checkpoint_reproduces_the_test_metrics(trained_run, tmp_path):
    cfg, metrics = trained_run
    best = Path(metrics["test_checkpoint"])
    ecfg = point_paths_at(compose_train([f"ckpt_path={best}"], config_name="eval"), tmp_path)
    emetrics = runner.evaluate_checkpoint(ecfg)
    written = json.loads(best.with_name(best.stem + ".test_metrics.json").read_text())
    assert written["checkpoint"] == str(best) and written["split"] == "test"
    assert written["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert written["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)
    assert emetrics["test/acc"] == written["test/acc"]

    vcfg = point_paths_at(compose_train([f"ckpt_path={best}", "split=val"], config_name="eval"), tmp_path)
    runner.evaluate_checkpoint(vcfg)
    val = json.loads(best.with_name(best.stem + ".val_metrics.json").read_text())
    assert val["split"] == "val" and 0.0 <= val["val/acc"] <= 1.0


def test_evaluate_checkpoint_refuses_other_files(tmp_path):
    missing = point_paths_at(compose_train([f"ckpt_path={tmp_path / 'nope.ckpt'}"], config_name="eval"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        runner.evaluate_checkpoint(missing)
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    foreign = point_paths_at(compose_train([f"ckpt_path={tmp_path / 'foreign.ckpt'}"], config_name="eval"), tmp_path)
    with pytest.raises(ValueError, match="not a checkpoint written by this suite"):
        runner.evaluate_checkpoint(foreign)


class _CreatesFile:
    """Unpickling this would create a file: a weights-only load refuses it without running it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.slow  # one eval.py subprocess
def test_crafted_pickle_never_runs(make_cfg, tmp_path):
    from transferrable.core.errors import find_user_error

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"backbone.stages.conv1.0.weight": _CreatesFile(marker)},
                "run_config_yaml": "task_name: classify\n"}, evil)
    ecfg = point_paths_at(compose_train([f"ckpt_path={evil}"], config_name="eval"), tmp_path / "eval")
    with pytest.raises(Exception) as err:  # eval.py ckpt_path=
        runner.evaluate_checkpoint(ecfg)
    assert find_user_error(err.value) is err.value and "not a loadable weights-only checkpoint" in str(err.value)
    for override in (f"ckpt_path={evil}", f"backbone.weights={evil}"):  # train.py: resume / initial weights
        with pytest.raises(Exception) as err:
            runner.train(make_cfg(*MINI, override, out=override.split("=")[0]))
        user = find_user_error(err.value)  # what train.py prints (unwrapped from Hydra's InstantiationException)
        msg = str(user)
        assert user is not None and "\n" not in msg and "\x1b" not in msg, msg
        assert f"{override.split('=')[0]}={str(evil)!r}: not a loadable weights-only checkpoint" in msg
        assert "the pickle asks for code, refused: Unsupported global: GLOBAL io.open" in msg
    assert not marker.exists()
    p = _run("eval.py", f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 'cli'}")  # the command line: one line
    assert p.returncode == 2 and not marker.exists(), p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: ckpt_path={str(evil)!r}: not a loadable")
    assert "Traceback" not in p.stderr


# -- the source representation cache ------------------------------------------------------------
def test_source_key_ignores_only_weights_freeze_and_norm_eval():
    base = compose_train([])
    key = source.source_key(base.backbone, "fashion_mnist")
    assert key.startswith("caffenetmini-fashion_mnist-28px-")
    same = compose_train(["backbone.freeze=conv3", "backbone.weights=/x.pt", "backbone.norm_eval=false"])
    assert source.source_key(same.backbone, "fashion_mnist") == key
    for other in (["backbone.fc_dim=128"], ["backbone.input_size=64"], ["backbone.widths=[8,8,8,8,8]"]):
        assert source.source_key(compose_train(other).backbone, "fashion_mnist") != key, other
    assert source.source_key(base.backbone, "mnist") != key


def test_source_overrides_become_hydra_overrides():
    assert source._as_overrides(
        {"trainer": {"max_epochs": 2, "limit_val_batches": None}, "dataset.mean": [0.1, 0.2], "x": True}
    ) == ["trainer.max_epochs=2", "trainer.limit_val_batches=null", "dataset.mean=[0.1,0.2]", "x=true"]


def test_source_representation_is_pretrained_once_and_reused(make_cfg, fmnist_dir, tmp_path, monkeypatch):
    calls = []
    real = source.pretrain_source
    monkeypatch.setattr(source, "pretrain_source", lambda *a: calls.append(a) or real(*a))
    cache = tmp_path / "shared_cache"

    def cfg_for(out: str, *extra: str):
        # nested keys, as `+source_overrides.trainer.max_epochs=1` gives on the command line
        cfg = make_cfg(*MINI, "backbone.weights=source:fashion_mnist", f"+source_overrides.dataset.data_dir={fmnist_dir}",
                       "+source_overrides.trainer.max_epochs=1", "+source_overrides.dataset.batch_size=32",
                       *extra, out=out, cache_dir=cache)
        with open_dict(cfg):
            for split in ("train", "val", "test"):
                cfg.source_overrides[f"++trainer.limit_{split}_batches"] = 2
        return cfg

    cfg1 = cfg_for("first")
    path = source.source_checkpoint_path(cfg1, "fashion_mnist")
    assert path.parent == cache / "source" and not path.exists()
    m1 = runner.train(cfg1)
    assert len(calls) == 1 and path.is_file()
    assert cfg1.backbone.weights == str(path)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert blob["arch"] == "caffenet_mini" and blob["source_dataset"] == "fashion_mnist"
    assert 0.0 <= blob["metrics"]["test/acc"] <= 1.0
    assert not any(k.startswith("backbone.") for k in blob["state_dict"])
    pre_metrics = json.loads((path.with_suffix(".run") / "metrics.json").read_text())
    assert pre_metrics["test/acc"] == pytest.approx(blob["metrics"]["test/acc"])
    assert math.isfinite(m1["test/acc"])
    mtime = path.stat().st_mtime_ns

    # second run: different freeze (not part of the key) -> reuses the cache, no pretraining
    cfg2 = cfg_for("second", "backbone.freeze=all")
    assert source.source_checkpoint_path(cfg2, "fashion_mnist") == path
    runner.train(cfg2)
    assert len(calls) == 1
    assert path.stat().st_mtime_ns == mtime
    # the backbone really got the source weights: fully frozen, so its checkpoint still holds them exactly
    ckpt = torch.load(Path(cfg2.paths.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    got = {k[len("backbone."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}
    assert got.keys() == blob["state_dict"].keys()
    assert all(torch.equal(got[k], v) for k, v in blob["state_dict"].items())
    assert any(v.abs().sum() > 0 for k, v in got.items() if "running_mean" in k)  # pretrained BN stats


def test_unknown_source_dataset_lists_choices(cfg_train):
    cfg = cfg_train
    with open_dict(cfg):
        cfg.backbone.weights = "source:imagenet"
    with pytest.raises(ValueError, match=r"unknown source dataset 'imagenet'; choices: \[.*'fashion_mnist'"):
        runner.train(cfg)


# -- ablation report ----------------------------------------------------------------------------
def test_report_over_a_fake_multirun(make_cfg, tmp_path):
    from transferrable.run.report import write_report

    sweep = tmp_path / "multirun"
    runs = {}
    for job, freeze in enumerate(["none", "conv3"]):
        overrides = [f"backbone.freeze={freeze}", "trainer.max_epochs=1"]
        cfg = make_cfg(*MINI, *overrides, out=f"multirun/{job}")
        runs[freeze] = runner.train(cfg)
        (sweep / str(job) / ".hydra").mkdir(parents=True)
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))

    # freezing went through Lightning's train() calls: frozen BN kept its init statistics (0), others moved
    for job, freeze in enumerate(["none", "conv3"]):
        sd = torch.load(sweep / str(job) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        conv1_mean = sd["backbone.stages.conv1.1.running_mean"]
        assert bool((conv1_mean == 0).all()) == (freeze == "conv3"), freeze
        assert sd["backbone.stages.conv4.1.running_mean"].abs().sum() > 0

    table = write_report(sweep)
    lines = table.split("\n\n")[0].strip().splitlines()  # the run table (the knob plots' links follow)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert header[0] == "backbone.freeze" and "trainer.max_epochs" not in header  # only what varies
    assert "test/acc" in header and "test/loss" in header
    assert len(rows) == 2 and [r[0] for r in rows] == ["none", "conv3"]
    col = header.index("test/acc")
    assert [float(r[col]) for r in rows] == [pytest.approx(runs[f]["test/acc"], abs=1e-4) for f in ("none", "conv3")]
    assert (sweep / "report.md").read_text() == table

    assert (sweep / "knob_backbone.freeze.png").is_file() and "![knob_backbone.freeze]" in table
    chosen = write_report(sweep, ["test/acc"]).splitlines()
    assert chosen[0] == "| backbone.freeze | test/acc |"
    assert chosen[2] == f"| none | {runs['none']['test/acc']:.4f} |"


def test_report_without_runs(tmp_path):
    from transferrable.run.report import write_report

    with pytest.raises(FileNotFoundError, match="no run with metrics.json"):
        write_report(tmp_path)


# -- the command line, end to end ---------------------------------------------------------------
def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRANSFERRABLE_CACHE": "/nonexistent-cache-should-not-be-used"}
    env.pop("TRANSFERRABLE_TRACEBACK", None)
    return run_script(list(args), cwd=ROOT, env=env, timeout=timeout)


@pytest.mark.slow
def test_cli_train_then_eval(fmnist_dir, tmp_path):
    run_dir = tmp_path / "run"
    p = _run("train.py", "debug=limit", f"dataset.data_dir={fmnist_dir}", "dataset.batch_size=32",
             "dataset.eval_batch_size=50", "backbone.widths=[8,16,16,16,16]", "backbone.fc_dim=32",
             "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={run_dir}")
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert 0.0 <= metrics["test/acc"] <= 1.0 and "test metrics  : test/acc=" in p.stdout

    p = _run("eval.py", f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads((run_dir / "checkpoints" / "last.test_metrics.json").read_text())
    assert out["checkpoint"] == str(last) and 0.0 <= out["test/acc"] <= 1.0 and math.isfinite(out["test/loss"])
    # both test the same 2 batches of 50 (debug=limit); when the best checkpoint is the last, same numbers
    if Path(metrics["test_checkpoint"]).name == "last.ckpt":
        assert out["test/acc"] == pytest.approx(metrics["test/acc"])

    p = _run("eval.py", f"report={tmp_path}", "metrics=[test/acc]", f"hydra.run.dir={tmp_path / 'report'}")
    assert p.returncode == 0, p.stderr[-3000:]
    table = (tmp_path / "report.md").read_text()
    assert table in p.stdout
    header, _, row = table.splitlines()
    assert header.endswith("| test/acc |") and "debug" in header  # the run's overrides label the row
    assert row.endswith(f"| {metrics['test/acc']:.4f} |") and "| limit |" in row


def test_cli_unknown_backbone_lists_choices(tmp_path):
    p = _run("train.py", "backbone=nonexistent", f"hydra.run.dir={tmp_path}")
    assert p.returncode != 0
    assert "Could not find 'backbone/nonexistent'" in p.stderr
    for option in ("alexnet", "caffenet_mini", "resnet18", "resnet50", "vgg16"):
        assert option in p.stderr


def test_every_torch_load_is_weights_only():
    """A guard for new code: every ``torch.load`` passes ``weights_only=True``, every Lightning call given a
    ``ckpt_path`` passes ``weights_only=True`` too, and no ``np.load`` allows pickles."""
    import ast

    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".venv") or any(p.startswith(".") for p in rel.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            kw = {k.arg: k.value for k in node.keywords}
            name = f"{ast.unparse(node.func)}"
            weights_only = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if name == "torch.load" and not weights_only:
                bad.append(f"{rel}:{node.lineno} {name} without weights_only=True")
            if node.func.attr in ("fit", "test", "validate") and "ckpt_path" in kw and not weights_only:
                bad.append(f"{rel}:{node.lineno} {name}(ckpt_path=...) without weights_only=True")
            if name in ("np.load", "numpy.load") and isinstance(kw.get("allow_pickle"), ast.Constant) \
                    and kw["allow_pickle"].value is not False:
                bad.append(f"{rel}:{node.lineno} {name} with allow_pickle")
    assert not bad, bad


def test_source_key_follows_the_pretraining_recipe():
    """The classify recipe the source would be pretrained with is in its key: a changed default (epochs, batch,
    augmentation, optimiser) is a new cache entry, never a silently reused file trained another way."""
    cfg = compose_train(["backbone.weights=source:fashion_mnist"])
    recipe = source.pretraining_recipe(cfg, "fashion_mnist")
    assert recipe["epochs"] == cfg.trainer.max_epochs  # the main job's own recipe (task=classify)
    assert recipe["data"]["batch_size"] == cfg.dataset.batch_size and recipe["model"]["optimizer"]["lr"] == 0.1
    key = source.source_key(cfg.backbone, "fashion_mnist", None, recipe)
    for change in ({"epochs": recipe["epochs"] + 1}, {"data": {**recipe["data"], "augment": "flip_crop_x"}}):
        assert source.source_key(cfg.backbone, "fashion_mnist", None, {**recipe, **change}) != key
    with_override = compose_train(["backbone.weights=source:fashion_mnist", "+source_overrides.trainer.max_epochs=1"])
    assert source.pretraining_recipe(with_override, "fashion_mnist")["epochs"] == 1
    assert source.source_checkpoint_path(with_override, "fashion_mnist") != source.source_checkpoint_path(cfg, "fashion_mnist")
