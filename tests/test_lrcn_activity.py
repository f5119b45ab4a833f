"""task=lrcn_activity: clip/video averaging, the single-frame baseline, late fusion and the Table 4.1-4.3 report,
and a tiny end-to-end run where LRCN beats the single-frame baseline on motions no single frame resolves."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, compose_train, point_paths_at
from omegaconf import OmegaConf, open_dict

from engine.lrcn.report import fuse, fusion_line
from engine.lrcn.scores import load_video_scores, save_video_scores
from lightning_modules.lrcn import LRCNActivityModule
from models.backbones import CaffeNetMini
from models.lrcn import LRCN, clip_starts
from transferrable.metrics.classification import per_class_accuracy
from transferrable.run.report import write_report
from transferrable.run.runner import train


def _tiny_backbone(**kw) -> CaffeNetMini:
    return CaffeNetMini(input_size=16, widths=[8, 16, 16, 16, 16], fc_dim=32, pool5_size=2, **kw)


def _module(num_classes: int, **lrcn) -> LRCNActivityModule:
    """The module with conf/task/lrcn_activity.yaml's ``lrcn:`` node (``lrcn`` overrides it), 16-frame clips every 8."""
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "task" / "lrcn_activity.yaml").lrcn, lrcn)
    return LRCNActivityModule(_tiny_backbone(), num_classes, cfg, clip_length=16, test_stride=8,
                              optimizer=functools.partial(torch.optim.AdamW))


def test_clip_starts():
    assert clip_starts(24, 16, 8) == [0, 8]
    assert clip_starts(40, 16, 8) == [0, 8, 16, 24]
    assert clip_starts(16, 16, 8) == [0] and clip_starts(10, 16, 8) == [0]


def test_lrcn_shapes_and_single_frame_baseline():
    torch.manual_seed(0)
    lstm = LRCN(_tiny_backbone(), 5, "fc6", "lstm", hidden=12)
    assert lstm(torch.randn(2, 4, 3, 16, 16)).shape == (2, 4, 5)
    assert lstm.lstm.hidden_size == 12
    assert all(m.p == 0 for m in lstm.backbone.stages["fc6"].modules() if isinstance(m, torch.nn.Dropout))
    single = LRCN(_tiny_backbone(), 5, "fc6", "none").eval()
    assert not hasattr(single, "lstm")
    x = torch.randn(1, 4, 3, 16, 16)
    per_frame = single(x)[0]
    # no recurrence: each step's scores depend on its own frame only
    assert torch.allclose(per_frame[2], single(x[:, 2:3])[0, 0], atol=1e-5)
    with pytest.raises(ValueError, match="sequence_model"):
        LRCN(_tiny_backbone(), 5, "fc6", "gru")


def test_video_score_is_clip_then_video_average():
    torch.manual_seed(0)
    module = _module(3, sequence_model="none", channels_last=False).eval()
    video = torch.randn(24, 3, 16, 16)
    probs = module.net.classifier(module.net.frame_features(video)).softmax(-1)  # per frame
    expected = (probs[0:16].mean(0) + probs[8:24].mean(0)) / 2
    assert torch.allclose(module.video_scores(video), expected, atol=1e-5)
    lrcn = _module(3, hidden_rgb=8, channels_last=False).eval()
    feats = lrcn.net.frame_features(video)
    clip_probs = [lrcn.net.sequence_scores(feats[s:s + 16][None])[0].softmax(-1).mean(0) for s in (0, 8)]
    assert torch.allclose(lrcn.video_scores(video), sum(clip_probs) / 2, atol=1e-5)


def _scores(n: int, k: int, correct: list[bool], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    scores = rng.uniform(0, 0.2, (n, k))
    for i, ok in enumerate(correct):
        scores[i, labels[i] if ok else (labels[i] + 1) % k] += 1
    return scores / scores.sum(1, keepdims=True), labels


def _fake_sweep(tmp_path, k=3, n=12):
    classes = [f"C{i}" for i in range(k)]
    videos = [f"C{i % k}/v_{i}.avi" for i in range(n)]
    runs = {}
    patterns = {("lstm", "rgb"): [i % 2 == 0 for i in range(n)], ("none", "rgb"): [i % 3 == 0 for i in range(n)],
                ("lstm", "flow"): [i % 4 != 0 for i in range(n)], ("none", "flow"): [i % 2 == 1 for i in range(n)]}
    for j, ((seq, mod), correct) in enumerate(patterns.items()):
        d = tmp_path / str(j)
        (d / ".hydra").mkdir(parents=True)
        overrides = [f"lrcn.sequence_model={seq}", f"lrcn.modality={mod}"] + (["lrcn.hidden_flow=64"] if mod == "flow" else [])
        (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))  # a flow-only knob still pairs
        scores, labels = _scores(n, k, correct, j)
        save_video_scores(d / "video_scores.npz", scores, labels, videos, classes, mod, seq)
        (d / "metrics.json").write_text(json.dumps({"test/acc": float(np.mean(correct))}))
        runs[seq, mod] = load_video_scores(d / "video_scores.npz")
    return runs


def test_fusion_and_report_tables(tmp_path):
    runs = _fake_sweep(tmp_path)
    rgb, flow = runs["lstm", "rgb"], runs["lstm", "flow"]
    fused, labels = fuse(rgb, flow, 1 / 3, 2 / 3)
    assert np.allclose(fused, rgb["scores"] / 3 + 2 * flow["scores"] / 3) and np.array_equal(labels, rgb["labels"])
    half = ((rgb["scores"] + flow["scores"]) / 2).argmax(1) == labels
    report = write_report(tmp_path)
    assert "Table 4.1" in report and "Table 4.2 (rgb)" in report and "Table 4.3" in report
    row = next(line for line in report.splitlines() if line.startswith("| LRCN-fc6"))
    cells = [c.strip().split(" ±")[0].strip("*") for c in row.split("|")[2:6]]
    assert float(cells[0]) == pytest.approx(50.0) and float(cells[1]) == pytest.approx(75.0)
    assert float(cells[2]) == pytest.approx(100 * half.mean(), abs=0.01)
    # Table 4.3 deltas are LRCN flow minus LRCN RGB per class
    delta = 100 * (per_class_accuracy(labels, flow["scores"].argmax(1), 3) - per_class_accuracy(labels, rgb["scores"].argmax(1), 3))
    table43 = report.split("Table 4.3")[1]
    assert f"{delta.max():+.2f}" in table43
    assert "| RGB | Flow |" in fusion_line(tmp_path / "0", tmp_path / "2")


def _tiny_cfg(tmp_path, fmnist_dir, sequence_model: str, *extra: str, logger: str = "none"):
    cfg = compose_train([
        "task=lrcn_activity", f"logger={logger}", "hardware=cpu", "trainer.precision=32-true", "seed=0",
        "backbone.weights=null", "backbone.input_size=16", "backbone.widths=[8,16,16,16,16]", "backbone.fc_dim=32",
        "backbone.pool5_size=2", f"lrcn.sequence_model={sequence_model}", "lrcn.hidden_rgb=32",
        "lrcn.feature_dropout=0.0", "model.optimizer.lr=1e-3", "trainer.max_epochs=16",
        "dataset.actions=[MoveLeft,MoveRight]", "dataset.clips_per_group=4", "dataset.num_frames=20",
        "dataset.video_size=20", "dataset.frame_size=[20,20]", "dataset.noise=0.0", "dataset.camera_jitter=0.0",
        f"dataset.source_dir={fmnist_dir}", "dataset.batch_size=4", "dataset.val_groups=0", "dataset.progress=false",
        "trainer.enable_model_summary=false", "++trainer.enable_progress_bar=false", "~callbacks.progress_bar",
        "~callbacks.model_summary", "~callbacks.lr_monitor", "~callbacks.model_checkpoint",
        "++trainer.enable_checkpointing=false", *extra,
    ])
    return point_paths_at(cfg, tmp_path / sequence_model, tmp_path / "cache")


@pytest.mark.slow
def test_lrcn_beats_single_frame_on_left_vs_right(tmp_path, fmnist_dir):
    """MoveLeft vs MoveRight: every frame of one class is a plausible frame of the other, so the single-frame
    baseline stays near chance while the LSTM reads the direction from the order of the frames. At the thesis's
    lr 1e-3 for 16 epochs the LSTM reached 1.0 with seeds 0-2 in fp32 on an AVX2-capped oneDNN; at 3e-3 for 10
    epochs it was 0.82/1.0/0.96 there (and 0.768 on an AMD EPYC), so the old setting tested luck."""
    results = {seq: train(_tiny_cfg(tmp_path, fmnist_dir, seq)) for seq in ("lstm", "none")}
    lrcn, single = results["lstm"]["test/acc"], results["none"]["test/acc"]
    assert lrcn >= 0.8, results
    assert lrcn - single >= 0.25, results
    saved = load_video_scores(tmp_path / "lstm" / "video_scores.npz")
    assert saved["scores"].shape == (56, 2) and saved["classes"] == ["MoveLeft", "MoveRight"]
    assert (tmp_path / "lstm" / "confusion.png").stat().st_size > 1000


def test_confusion_png_goes_to_an_offline_wandb_run(tmp_path, fmnist_dir, monkeypatch):
    """logger=wandb (offline): the test-end confusion matrix is in the offline run's media files, byte for byte."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _tiny_cfg(tmp_path, fmnist_dir, "none", "trainer.max_epochs=1", "dataset.clips_per_group=1",
                    "dataset.num_frames=16", logger="wandb")
    train(cfg)
    png = tmp_path / "none" / "confusion.png"
    runs = list((tmp_path / "none" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = list((runs[0] / "files" / "media" / "images" / "lrcn").glob("confusion_*.png"))
    assert len(logged) == 1 and logged[0].read_bytes() == png.read_bytes()


def test_eval_of_a_checkpoint_writes_the_video_scores_beside_it(tmp_path, fmnist_dir):
    """``eval.py ckpt_path=<LRCN checkpoint>``: the task's ``test_outputs`` write the per-video scores and the
    confusion matrix next to the checkpoint, as the run itself did in its directory (fusion reads either)."""
    from transferrable.run.runner import evaluate_checkpoint

    cfg = _tiny_cfg(tmp_path, fmnist_dir, "lstm", "trainer.max_epochs=1", "dataset.clips_per_group=1",
                    "dataset.num_frames=16", "++trainer.enable_checkpointing=true")
    with open_dict(cfg):
        cfg.callbacks.model_checkpoint = {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
                                          "dirpath": str(tmp_path / "ckpt"), "save_last": True}
    metrics = train(cfg)
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    again = evaluate_checkpoint(OmegaConf.create({"ckpt_path": str(ckpt)}))
    assert again["test/acc"] == pytest.approx(metrics["test/acc"])
    saved = load_video_scores(tmp_path / "ckpt" / "video_scores.npz")
    assert saved["classes"] == ["MoveLeft", "MoveRight"] and (tmp_path / "ckpt" / "confusion.png").is_file()
