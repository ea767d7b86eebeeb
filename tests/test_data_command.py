"""``metalearn data info|prepare``: what is on disk, and getting it ready, through the real CLI."""

from __future__ import annotations

from test_omniglot import fake_archive


def test_info_and_prepare_of_omniglot(cli, tmp_path):
    root = tmp_path / "data"
    alphabets = {"Alpha": 3, "Beta": 2, "Gamma": 2}
    fake_archive(root / "omniglot", "set1", alphabets)
    args = ["data.root=" + str(root), "data.archives=[set1]", "data.download=false",
            "data.train=[Alpha]", "data.val=[Beta]", "data.test=[Gamma]"]
    runs = cli.run_many({
        "missing": (["data", "info", "data=omniglot", f"data.root={tmp_path / 'empty'}"], tmp_path),
        "usage": (["data", "show", "data=omniglot"], tmp_path),
        "unknown": (["data", "info", "data=nope"], tmp_path),
        "sinusoid": (["data", "info", "data=sinusoid"], tmp_path),
    })
    missing = runs["missing"]
    assert missing.returncode == 1, cli.describe(missing)
    assert f"{tmp_path / 'empty/omniglot/images_background.zip'}  (missing)" in missing.stdout
    assert "not ready: Omniglot archive(s) images_background.zip, images_evaluation.zip not found" in missing.stdout
    assert not (tmp_path / "empty").exists()  # info downloads nothing and creates nothing
    assert runs["usage"].returncode == 2 and "usage: metalearn data info|prepare" in runs["usage"].stderr
    assert runs["unknown"].returncode == 2 and "unknown data 'nope'; choose one of:" in runs["unknown"].stderr
    assert runs["sinusoid"].returncode == 0 and "regression tasks drawn on the fly" in runs["sinusoid"].stdout

    prepare = cli.run(["data", "prepare", "data=omniglot", *args], tmp_path)
    assert prepare.returncode == 0, cli.describe(prepare)
    assert "train: 12 classes, 24 images of 1x28x28" in prepare.stdout  # 3 characters x 4 rotations, 2 drawings each
    assert "val: 8 classes" in prepare.stdout and "test: 8 classes" in prepare.stdout
    assert f"cache {root / 'omniglot/cache'}: set1-28px-v1.pt" in prepare.stdout and prepare.stdout.rstrip().endswith("ready")
    info = cli.run(["data", "info", "data=omniglot", *args], tmp_path)
    assert info.returncode == 0 and f"{root / 'omniglot/set1.zip'}  (" in info.stdout, cli.describe(info)
    assert f"{root / 'omniglot/set1'}/  (folder, 14 files)" in info.stdout
