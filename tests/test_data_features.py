"""data=features: a trained backbone's embeddings of a dataset, computed once, cached, served as vector tasks.

Checked against the backbone itself (rebuilt from the checkpoint and run on the source images), the
cache's reuse and rebuild, the user's mistakes (one line each), ``metalearn data info``, and other
algorithms on the features.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from metalearn import checkpoint, engine
from metalearn.config import to_run_config
from metalearn.data import features, glyphs
from metalearn.errors import CheckpointError, ConfigError
from metalearn.models import conv4

LEARNING_GLYPHS = glyphs.Config(split_sizes=[100, 5, 50])  # what BASELINE_RUN trains on


def backbone_of(run_dir):
    ckpt = checkpoint.load(run_dir / "checkpoints" / "best.pt")
    net = conv4.build(conv4.Config(hidden=32), (1, 28, 28))
    net.load_state_dict({k.removeprefix("backbone."): v for k, v in ckpt["model"].items() if k.startswith("backbone.")})
    return net.eval()


def test_features_are_the_backbones_embeddings(baseline_run, tmp_path):
    images = glyphs.load(LEARNING_GLYPHS)
    net = backbone_of(baseline_run)
    # one chunk: every image of a split normalised together, whatever the order
    whole = features.load(features.Config(run=str(baseline_run), root=str(tmp_path / "a"), batch_size=1000))
    for split in ("train", "val", "test"):
        assert whole[split].class_names == images[split].class_names
        assert torch.equal(whole[split].counts, images[split].counts)
        assert whole[split].input_shape == (32,) and whole[split].images.dtype == torch.float32
    with torch.no_grad():
        expected = net(images["val"].images.float() / 255)
    # Another order of the same images: the same statistics up to the float32 rounding of their sums
    # over the 100 x H x W values (models/ops.py), which depends on the order.
    torch.testing.assert_close(whole["val"].images, expected, rtol=1e-4, atol=1e-4)
    # chunks: near-equal parts of a fixed random order (seed 0), each normalised on its own
    chunked = features.load(features.Config(run=str(baseline_run), root=str(tmp_path / "b"), batch_size=30))
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    parts = order.tensor_split(math.ceil(100 / 30))
    assert [len(p) for p in parts] == [25, 25, 25, 25]
    for idx in parts:
        with torch.no_grad():
            torch.testing.assert_close(chunked["val"].images[idx], net(images["val"].images[idx].float() / 255),
                                       rtol=1e-5, atol=1e-5)
    assert not torch.allclose(chunked["val"].images, whole["val"].images)  # the statistics are the set's


def test_cache_is_reused_and_rebuilt_when_the_checkpoint_changes(baseline_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(baseline_run, run)
    cfg = features.Config(run=str(run), root=str(tmp_path / "data"))
    first = features.load(cfg)
    (cache,) = (tmp_path / "data" / "features").glob("glyphs-*.pt")
    stamp = cache.stat().st_mtime_ns
    again = features.load(cfg)
    assert cache.stat().st_mtime_ns == stamp and torch.equal(again["test"].images, first["test"].images)
    # another checkpoint in the same place: computed again, in place
    ckpt = checkpoint.load(run / "checkpoints" / "best.pt")
    ckpt["model"]["backbone.convs.3.weight"] = ckpt["model"]["backbone.convs.3.weight"] * 2
    checkpoint.save(run / "checkpoints" / "best.pt", **{k: v for k, v in ckpt.items() if k not in ("format", "format_version", "version")})
    changed = features.load(cfg)
    assert list((tmp_path / "data" / "features").glob("glyphs-*.pt")) == [cache]
    assert cache.stat().st_mtime_ns != stamp and not torch.equal(changed["test"].images, first["test"].images)
    # a damaged cache is only a cache: rebuilt
    cache.write_bytes(b"not a torch file")
    torch.testing.assert_close(features.load(cfg)["test"].images, changed["test"].images, rtol=0, atol=0)
    # the last checkpoint is another cache
    features.load(features.Config(run=str(run), root=str(tmp_path / "data"), checkpoint="last"))
    assert len(list((tmp_path / "data" / "features").glob("glyphs-*.pt"))) == 2


def test_another_source_dataset(baseline_run, tmp_path):
    # data.source: a data= option with its own defaults (glyphs: 300/100/100 classes), embedded by this backbone
    stores = features.load(features.Config(run=str(baseline_run), root=str(tmp_path), source="glyphs"))
    assert (stores["train"].num_classes, stores["val"].num_classes, stores["test"].num_classes) == (300, 100, 100)


def test_mistakes_are_one_clear_line(baseline_run, trained_run, tmp_path):
    root = str(tmp_path)
    cases = [
        (features.Config(root=root), ConfigError, "data.run="),
        (features.Config(run=str(baseline_run), checkpoint="middle", root=root), ConfigError, "best, last"),
        (features.Config(run=str(baseline_run), batch_size=0, root=root), ConfigError, "data.batch_size"),
        (features.Config(run=str(baseline_run), source="nope", root=root), ConfigError, "omniglot_small"),
        (features.Config(run=str(baseline_run), source="sinusoid", root=root), ConfigError, "regression"),
        (features.Config(run=str(tmp_path / "missing"), root=root), CheckpointError, "does not exist"),
        (features.Config(run=str(trained_run), root=root), ConfigError, "algo=maml"),  # no separate backbone
    ]
    for cfg, error, text in cases:
        with pytest.raises(error, match=text) as info:
            features.load(cfg)
        assert "\n" not in str(info.value)


def test_other_algorithms_on_the_features(baseline_run, tmp_path):
    def run_config(algo, backbone):
        return to_run_config({"algo": {"name": algo}, "backbone": backbone, "device": {"type": "cpu"},
                              "data": {"name": "features", "run": str(baseline_run), "root": str(tmp_path)},
                              "meta_batch_size": 2, "queries": 3})

    cfg = run_config("protonet", {"name": "mlp", "hidden": [16]})
    stores = engine.load_data(cfg, torch.device("cpu"))
    algo = engine.build_algorithm(cfg, stores["train"])
    batch = stores["train"].sampler(5, 1, 3, 2, 0, training=True).sample()
    assert batch.support_x.shape == (2, 5, 32)
    metrics = algo.meta_step(batch)
    assert torch.isfinite(metrics["loss"]).all()
    with pytest.raises(ConfigError, match="nothing to meta-train"):  # a metric learner needs weights to learn
        engine.build_algorithm(run_config("protonet", {"name": "identity"}), stores["train"])


def test_cli_info_and_errors(cli, baseline_run, tmp_path):
    proc = cli.run(["data", "info", "data=features", f"data.run={baseline_run}", f"data.root={tmp_path}"], tmp_path)
    assert proc.returncode == 0, cli.describe(proc)
    assert "best.pt" in proc.stdout and "train: 100 classes, 2000 images of 32" in proc.stdout and "ready" in proc.stdout
    proc = cli.run(["train", "algo=leo", "data=features", "backbone=identity", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "data.run=" in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing half-written
