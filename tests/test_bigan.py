"""task=bigan (thesis ch. 5): the joint discriminator's wiring, every objective's losses and which modules
they train, the latent regressor's target, the 1-NN evaluator, BN folding for transfer, the NaN guard,
resuming, and the discrete latent's clustering metrics. Tiny sizes throughout (CPU, < 60 s)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import ROOT
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

import transferrable.run.runner as runner
from datamodules.in_memory import SplitTensors, batch_sampler_loader
from lightning_modules.bigan import BiGANModule, NonFiniteLossError
from models.bigan import (
    BiGANAlexNet,
    DCGANDiscriminator,
    DCGANGenerator,
    LatentPrior,
    MLPDiscriminator,
    fold_batchnorm,
    latent_target,
)
from models.bigan_training import OBJECTIVES, HalfwayExponentialDecay
from transferrable.core.errors import find_user_error
from transferrable.metrics.unsupervised_eval import cluster_nmi, cluster_purity, knn1_accuracy, knn1_predict

TINY = ["task=bigan", "bigan.hidden=[32,32]", "bigan.latent_dim=8", "bigan.bn_batches=2", "bigan.probe_max_train=200",
        "++trainer.limit_val_batches=null"]
SETTINGS = {"hidden": [16, 16], "latent_dim": 4, "grids": False}


def _module(**overrides) -> BiGANModule:
    """The module as conf/task/bigan.yaml builds it (``model:``), with SETTINGS and ``overrides`` in ``bigan:``."""
    torch.manual_seed(0)
    task = OmegaConf.load(ROOT / "conf" / "task" / "bigan.yaml")
    task.bigan = OmegaConf.merge(task.bigan, {**SETTINGS, **overrides})
    task.seed = 0
    return instantiate(task.model, backbone=None, num_classes=10)


# -- the joint discriminator -------------------------------------------------------------------------
def test_mlp_discriminator_adds_projected_z_at_every_hidden_layer_after_the_first():
    torch.manual_seed(0)
    d = MLPDiscriminator(in_dim=12, code_dim=3, hidden=[8, 8, 8])
    assert d.joint and len(d.z_proj) == 2  # layers 2 and 3, not the first
    assert [p.linear.weight.shape for p in d.z_proj] == [(8, 3), (8, 3)]
    x, z = torch.randn(6, 12), torch.rand(6, 3) * 2 - 1
    assert d(x, z).shape == (6,)
    with pytest.raises(ValueError, match="needs z"):
        d(x)
    # wiring: the projection is added to the pre-activation, before BN and the non-linearity
    d.eval()
    for m in d.norms:
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2.0)
    h = d.act(d.layers[0](x))
    for i, (layer, bn) in enumerate(zip(d.layers[1:], d.norms, strict=True)):
        h = d.act(bn(layer(h) + z @ d.z_proj[i].linear.weight.T))
    torch.testing.assert_close(d(x, z), d.out(h).squeeze(1))
    # z matters; a plain GAN discriminator of the same shape has no projections
    assert not torch.allclose(d(x, z), d(x, -z))
    assert MLPDiscriminator(12, None, [8, 8]).z_proj is None


def test_z_projection_init_std_and_dcgan_spatial_broadcast():
    torch.manual_seed(0)
    d = MLPDiscriminator(in_dim=784, code_dim=50, hidden=[1024, 1024])
    assert abs(float(d.z_proj[0].linear.weight.detach().std()) - 0.5) < 0.02
    assert abs(float(d.layers[1].weight.detach().std()) - 0.02) < 0.002
    conv = DCGANDiscriminator(image_size=16, channels=1, code_dim=5, width=4)
    assert len(conv.z_proj) == 3 and conv.z_proj[0](torch.zeros(2, 5)).shape == (2, 8, 1, 1)
    assert conv(torch.randn(2, 1, 16, 16), torch.rand(2, 5)).shape == (2,)
    assert DCGANGenerator(5, image_size=16, channels=1, width=4)(torch.rand(3, 5)).shape == (3, 1, 16, 16)


# -- objectives ------------------------------------------------------------------------------------
EXPECTED_TRAINED = {
    "bigan": "DGE", "gan_discriminator": "DG", "latent_regressor": "DGE", "joint_latent_regressor": "DGE",
    "autoencoder_l2": "GE", "autoencoder_l1": "GE",
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_objective_losses_finite_and_update_exactly_the_right_modules(objective):
    module = _module(objective=objective)
    x = torch.rand(8, 1, 28, 28)
    losses = module.compute_losses(x)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert ("D" in losses) == ("D" in EXPECTED_TRAINED[objective])
    before = {n: [p.detach().clone() for p in getattr(module, n).parameters()] for n in "DGE"}
    loader = DataLoader(TensorDataset((x * 255).to(torch.uint8), torch.zeros(8, dtype=torch.long)), batch_size=8)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader)
    for n in "DGE":
        changed = any(not torch.equal(a, b) for a, b in zip(before[n], getattr(module, n).parameters(), strict=True))
        assert changed == (n in EXPECTED_TRAINED[objective]), (objective, n)


@pytest.mark.parametrize("objective,into_generator", [("latent_regressor", False), ("joint_latent_regressor", True)])
def test_latent_regression_reaches_generator_only_for_the_joint_variant(objective, into_generator):
    module = _module(objective=objective)
    losses = module.compute_losses(torch.rand(8, 1, 28, 28))
    g_grads = torch.autograd.grad(losses["latent_regression"], list(module.G.parameters()), allow_unused=True,
                                  retain_graph=True)
    reached = any(g is not None and g.abs().sum() > 0 for g in g_grads)
    assert reached == into_generator
    e_grads = torch.autograd.grad(losses["latent_regression"], list(module.E.parameters()), allow_unused=True)
    assert all(g is not None for g in e_grads)


def test_latent_regressor_target_mapping():
    z = torch.tensor([[-1.0, 0.0, 1.0, 0.5]])
    torch.testing.assert_close(latent_target(z), torch.tensor([[0.0, 0.5, 1.0, 0.75]]))
    prior = LatentPrior("continuous", dim=4)
    # logits whose sigmoid is the target minimise the loss, and map back to z exactly
    t = latent_target(torch.tensor([[-0.5, 0.0, 0.3, 0.9]]))
    best = torch.log(t / (1 - t))
    z_back = prior.logits_to_code(best)
    torch.testing.assert_close(z_back, torch.tensor([[-0.5, 0.0, 0.3, 0.9]]))
    loss_best = prior.regression_loss(best, z_back, None)
    expected = torch.nn.functional.binary_cross_entropy(t, t, reduction="none").sum(1) / 4  # the entropy
    torch.testing.assert_close(loss_best, expected)
    assert float(prior.regression_loss(best + 1.0, z_back, None)) > float(loss_best)


def test_lr_schedule_constant_then_exponential_to_final():
    f = HalfwayExponentialDecay(total_steps=100, final_ratio=0.01)
    assert f(0) == f(49) == 1.0
    assert f(50) == pytest.approx(1.0) and f(75) == pytest.approx(0.1) and f(100) == pytest.approx(0.01)
    assert f(500) == pytest.approx(0.01)


# -- 1-NN evaluator --------------------------------------------------------------------------------
def test_knn1_exact_on_hand_made_points():
    gallery = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    labels = torch.tensor([3, 1, 4, 1])
    queries = torch.tensor([[1.0, 1.0], [9.0, 2.0], [2.0, 8.0], [11.0, 11.0], [5.0, 0.0]])
    pred, idx = knn1_predict(gallery, labels, queries)
    assert idx.tolist() == [0, 1, 2, 3, 0]  # the last query is equidistant: the lowest index wins
    assert pred.tolist() == [3, 1, 4, 1, 3]
    assert knn1_accuracy(gallery, labels, queries, torch.tensor([3, 1, 4, 0, 3])) == pytest.approx(0.8)
    # cosine ignores the norm: (1, 0.1) is closest in angle to (10, 0) although nearer to (0, 0)
    g = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    assert knn1_predict(g, torch.tensor([7, 8]), torch.tensor([[1.0, 0.1]]), "cosine")[0].tolist() == [7]
    with pytest.raises(ValueError):
        knn1_predict(gallery, labels[:2], queries)


def test_cluster_purity_and_nmi_on_constructed_cases():
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert cluster_purity([5, 5, 3, 3, 1, 1], labels) == 1.0 and cluster_nmi([5, 5, 3, 3, 1, 1], labels) == pytest.approx(1.0)
    assert cluster_purity([0] * 6, labels) == pytest.approx(1 / 3) and cluster_nmi([0] * 6, labels) == pytest.approx(0.0)
    assert cluster_purity([0, 1, 0, 1], [0, 0, 1, 1]) == 0.5 and cluster_nmi([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.0)
    assert cluster_purity([0, 0, 0, 1], [0, 0, 1, 1]) == 0.75


def test_discrete_prior_codes_and_category_grid():
    prior = LatentPrior("discrete", dim=3, categories=4, alpha=2.5)
    z, c = prior.sample(20, generator=torch.Generator().manual_seed(0))
    assert z.shape == (20, 7) and prior.code_dim == 7
    torch.testing.assert_close(z[:, :4], 2.5 * torch.nn.functional.one_hot(c, 4).float())
    grid = prior.grid(5)
    assert grid.shape == (20, 7)
    assert grid[:5, :4].argmax(1).tolist() == [0] * 5 and grid[5:10, :4].argmax(1).tolist() == [1] * 5  # rows
    torch.testing.assert_close(grid[0, 4:], grid[5, 4:])  # columns share the continuous part
    code = prior.logits_to_code(torch.tensor([[0.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(code[0, :4], torch.tensor([0.0, 2.5, 0.0, 0.0]))  # straight-through one-hot


# -- whole runs ------------------------------------------------------------------------------------
def test_bigan_run_metrics_grids_and_test_labels_stay_out_of_the_gallery(make_cfg, monkeypatch):
    import transferrable.metrics.unsupervised_eval as ue

    calls = []
    real = ue.knn1_predict

    def spy(gallery, gallery_labels, queries, *a, **k):
        calls.append((len(gallery), gallery_labels.clone(), len(queries)))
        return real(gallery, gallery_labels, queries, *a, **k)

    monkeypatch.setattr(ue, "knn1_predict", spy)
    built = []
    real_build = runner.build_model
    monkeypatch.setattr(runner, "build_model", lambda cfg, n: built.append(real_build(cfg, n)) or built[-1])
    cfg = make_cfg(*TINY, "bigan.latent=discrete", "bigan.objective=latent_regressor", "trainer.max_epochs=1")
    metrics = runner.train(cfg)
    out = Path(cfg.paths.output_dir)
    for key in ("test/knn1_acc", "test/knn1_raw_acc", "test/linear_probe_acc", "test/cluster_purity", "test/cluster_nmi",
                "val/knn1_acc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["test/knn1_raw_acc"] > 0.5  # the fixture's classes are separable in pixel space
    assert json.loads((out / "metrics.json").read_text())["test/knn1_acc"] == metrics["test/knn1_acc"]
    names = {p.name for p in (out / "samples").iterdir()}
    assert {"final_samples.png", "final_data.png", "final_reconstructions.png", "final_categories.png"} <= names
    assert list((Path(cfg.paths.cache_dir) / "bigan").glob("raw_knn1_*.json"))
    # every 1-NN gallery is built from the training (and validation) split, never from the test split
    module = built[0]
    train_val = torch.cat([module.data["train"].labels, module.data["val"].labels])
    n_test = len(module.data["test"])
    test_calls = [c for c in calls if c[2] == n_test]
    assert test_calls and all(c[0] == len(train_val) and torch.equal(c[1], train_val) for c in test_calls)
    val_calls = [c for c in calls if c[2] == len(module.data["val"])]
    assert val_calls and all(torch.equal(c[1], module.data["train"].labels) for c in val_calls)


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(make_cfg, monkeypatch):
    real = BiGANModule.compute_losses
    count = {"n": 0}

    def flaky(self, *a, **k):
        out = real(self, *a, **k)
        count["n"] += 1
        if count["n"] == 3:  # the first batch of the second epoch (2 batches per epoch)
            out["D"] = out["D"] * float("nan")
        return out

    monkeypatch.setattr(BiGANModule, "compute_losses", flaky)
    built = []
    real_build = runner.build_model
    monkeypatch.setattr(runner, "build_model", lambda cfg, n: built.append(real_build(cfg, n)) or built[-1])
    cfg = make_cfg(*TINY, "trainer.max_epochs=3")
    with pytest.raises(NonFiniteLossError, match="non-finite loss.*last good checkpoint") as err:
        runner.train(cfg)
    assert find_user_error(err.value) is err.value  # train.py prints it as one line, no traceback
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert str(last) in str(err.value)
    blob = torch.load(last, map_location="cpu", weights_only=True)
    assert blob["epoch"] == 0 and all(torch.isfinite(v).all() for v in blob["state_dict"].values() if v.is_floating_point())
    # the bad step was never applied: the weights are those of the checkpoint (BN running statistics
    # moved in the forward pass that produced the NaN; they are re-estimated before any evaluation anyway)
    params = dict(built[0].named_parameters())
    assert params and all(torch.equal(p, blob["state_dict"][k]) for k, p in params.items())


class _Capture(L.Callback):
    def __init__(self):
        self.at_start = None

    def on_train_epoch_start(self, trainer, pl_module):
        if self.at_start is None:  # deep copies: Adam updates its state tensors in place afterwards
            self.at_start = copy.deepcopy({
                "optimizers": [o.state_dict() for o in trainer.optimizers],
                "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
                "lr": [o.param_groups[0]["lr"] for o in trainer.optimizers],
            })


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_resume_restores_all_three_optimisers_and_the_schedule(make_cfg, monkeypatch):
    # a short schedule so that the learning rate is already decaying when the checkpoint is written
    first = make_cfg(*TINY, "trainer.max_epochs=2", "bigan.decay_start=0.25", out="first")
    runner.train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    blob = torch.load(last, map_location="cpu", weights_only=True)
    assert len(blob["optimizer_states"]) == 3 and len(blob["lr_schedulers"]) == 3
    assert blob["lr_schedulers"][0]["last_epoch"] == 4  # 2 epochs x 2 batches

    capture = _Capture()
    real_build = runner.build_trainer
    monkeypatch.setattr(runner, "build_trainer", lambda cfg, loggers=None: _with(real_build(cfg, loggers), capture))
    second = make_cfg(*TINY, "trainer.max_epochs=3", "bigan.decay_start=0.25", f"ckpt_path={last}", out="second")
    runner.train(second)
    got = capture.at_start
    assert _same(got["optimizers"], blob["optimizer_states"])
    for restored, saved in zip(got["schedulers"], blob["lr_schedulers"], strict=True):
        assert restored["last_epoch"] == saved["last_epoch"] == 4 and restored["_last_lr"] == saved["_last_lr"]
    assert got["lr"][0] == pytest.approx(blob["lr_schedulers"][0]["_last_lr"][0]) and got["lr"][0] < 2e-4
    assert all(s["exp_avg"].abs().sum() > 0 for s in got["optimizers"][0]["state"].values())  # not fresh Adam
    # ... and the schedule went on from there (2 more batches), not from step 0
    resumed = torch.load(Path(second.paths.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert [s["last_epoch"] for s in resumed["lr_schedulers"]] == [6, 6, 6]


def _with(trainer, callback):
    trainer.callbacks.append(callback)
    return trainer


# -- conv BiGAN, BN folding and transfer --------------------------------------------------------------
def _randomise_bn(net: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g))


def test_batchnorm_folding_preserves_outputs():
    kw = dict(input_size=16, in_channels=1, widths=[4, 6, 8, 8, 6], fc_dim=12, pool5_size=2)
    torch.manual_seed(0)
    bn = BiGANAlexNet(batch_norm=True, **kw).eval()
    _randomise_bn(bn)
    plain = BiGANAlexNet(batch_norm=False, **kw).eval()
    plain.load_state_dict(fold_batchnorm(bn))
    x = torch.randn(5, 3, 16, 16)
    for tap in ("conv1", "conv3", "conv5", "fc7"):
        torch.testing.assert_close(plain.forward_taps(x, [tap])[tap], bn.forward_taps(x, [tap])[tap], rtol=1e-4, atol=1e-5)


def test_conv_bigan_exports_encoder_that_classify_loads_frozen(make_cfg, tmp_path):
    arch = ["backbone.widths=[4,6,8,8,6]", "backbone.fc_dim=16", "backbone.pool5_size=2"]
    cfg = make_cfg(*TINY, "bigan.arch=conv", "bigan.image_size=16", "bigan.gan_width=4", "trainer.max_epochs=1",
                   "bigan.linear_probe=false", *arch, out="conv")
    metrics = runner.train(cfg)
    exported = Path(metrics["encoder_checkpoint"])
    assert exported.is_file() and math.isfinite(metrics["test/knn1_acc"])
    blob = torch.load(exported, map_location="cpu", weights_only=True)
    assert blob["arch"] == "bigan_alexnet" and blob["bn_folded"] and not any("running_mean" in k for k in blob["state_dict"])
    # Table 5.2: conv1..conv3 from the BiGAN and frozen, conv4.. re-initialised
    net = BiGANAlexNet(input_size=16, in_channels=1, widths=[4, 6, 8, 8, 6], fc_dim=16, pool5_size=2,
                       weights=str(exported), freeze="conv3", reinit_unfrozen=True)
    state = net.state_dict()
    assert torch.equal(state["stages.conv3.0.weight"], blob["state_dict"]["stages.conv3.0.weight"])
    assert not torch.equal(state["stages.conv4.0.weight"], blob["state_dict"]["stages.conv4.0.weight"])
    assert not any(p.requires_grad for p in net.stages["conv3"].parameters())
    assert all(p.requires_grad for p in net.stages["conv4"].parameters())
    # ... and task=classify trains on top of it
    clf = make_cfg("backbone=bigan_alexnet", "backbone.input_size=16", "backbone.in_channels=1", *arch,
                   f"backbone.weights={exported}", "backbone.freeze=conv3", "backbone.reinit_unfrozen=true",
                   "++trainer.fast_dev_run=true", out="classify")
    assert 0.0 <= runner.train(clf)["test/acc"] <= 1.0


def test_bench_entry_quick():
    from bench.bigan import bigan
    from bench.registry import Context

    figures = bigan(Context(quick=True, repeats=1))
    assert len(figures) == 2 and all(f.value.median > 0 for f in figures)


def test_in_memory_loader_indexes_whole_batches():
    split = SplitTensors(torch.arange(10, dtype=torch.uint8).reshape(10, 1, 1, 1), torch.arange(10))
    batches = list(batch_sampler_loader(split, 4, shuffle=True, seed=0, drop_last=True))
    assert [len(b[0]) for b in batches] == [4, 4]
    assert all(torch.equal(b[0].flatten().long(), b[1]) for b in batches)  # images and labels stay paired


def test_alternating_updates_train_all_three_modules():
    module = _module(objective="bigan", update="alternating")
    x = torch.rand(8, 1, 28, 28)
    before = {n: [p.detach().clone() for p in getattr(module, n).parameters()] for n in "DGE"}
    loader = DataLoader(TensorDataset((x * 255).to(torch.uint8), torch.zeros(8, dtype=torch.long)), batch_size=8)
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=0, num_sanity_val_steps=0).fit(module, train_dataloaders=loader)
    for n in "DGE":
        assert any(not torch.equal(a, b) for a, b in zip(before[n], getattr(module, n).parameters(), strict=True)), n


def test_bigan_weights_spec_trains_and_caches_a_conv_encoder(make_cfg, fmnist_dir):
    arch = ["backbone=bigan_alexnet", "backbone.input_size=16", "backbone.in_channels=1", "backbone.widths=[4,6,8,8,6]",
            "backbone.fc_dim=16", "backbone.pool5_size=2"]
    how = (f"+bigan_source_overrides={{trainer.max_epochs: 1, ++trainer.limit_train_batches: 2, dataset.data_dir: '{fmnist_dir}', "
           "dataset.batch_size: 32, bigan.gan_width: 4, bigan.latent_dim: 8, bigan.bn_batches: 2, bigan.linear_probe: false, "
           "callbacks: none}")
    cfg = make_cfg(*arch, "backbone.weights=bigan:fashion_mnist", "backbone.freeze=conv5", "backbone.reinit_unfrozen=true",
                   how, "++trainer.fast_dev_run=true", out="first")
    runner.train(cfg)
    cached = list((Path(cfg.paths.cache_dir) / "bigan").glob("bigan_alexnet-fashion_mnist-16px-*.pt"))
    assert len(cached) == 1 and cfg.backbone.weights == str(cached[0])
    again = make_cfg(*arch, "backbone.weights=bigan:fashion_mnist", "backbone.freeze=conv3", how,
                     "++trainer.fast_dev_run=true", out="second")
    runner.train(again)  # same architecture, dataset and recipe: the cached encoder, no second training
    assert again.backbone.weights == str(cached[0]) and len(list(cached[0].parent.glob("*.run"))) == 1
