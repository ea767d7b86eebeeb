"""``metalearn new algo|backbone|data NAME``: templates that train on glyphs straight away (metalearn/scaffold.py)."""

from __future__ import annotations

import ast
import json

from conftest import cli_env, describe, run_cli


def test_the_three_templates_train_together_through_the_cli(tmp_path):
    for group in ("algo", "backbone", "data"):
        proc = run_cli(["new", group, f"my_{group}", "--dir", "proj"], cwd=tmp_path)
        assert proc.returncode == 0, describe(proc)
        assert f"--config-dir conf {group}=my_{group}" in proc.stdout
    proj = tmp_path / "proj"
    for group in ("algo", "backbone", "data"):
        assert (proj / "conf" / group / f"my_{group}.yaml").is_file()
        ast.parse((proj / "tests" / f"test_my_{group}.py").read_text())  # the written test is valid Python
    run = proj / "run"
    proc = run_cli(["train", "--config-dir", "conf", "algo=my_algo", "backbone=my_backbone", "data=my_data",
                    "algo.init_temperature=2.0", "data.per_class=10", "steps=4", "meta_batch_size=2", "queries=5",
                    "trainer.val_every=2", "trainer.val_episodes=4", "trainer.test_episodes=4", f"hydra.run.dir={run}"],
                   cwd=proj, env=cli_env(PYTHONPATH=str(proj)))
    assert proc.returncode == 0, describe(proc)
    assert json.loads((run / "results.json").read_text())["test"]["accuracy"]["episodes"] == 4
    # nothing is overwritten; a bad name is one line
    proc = run_cli(["new", "algo", "my_algo", "--dir", "proj"], cwd=tmp_path)
    assert proc.returncode == 2 and "exists already" in proc.stderr and proc.stderr.count("\n") == 1, describe(proc)
    for bad in (["new", "algo", "My-Algo"], ["new", "algo", "maml"], ["new", "optimizer", "x"]):
        proc = run_cli(bad, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, describe(proc)
