"""train -> finetune -> eval on a tiny synthetic image folder (seconds, CPU)."""

import csv
import json

import pytest
import torch

from mpqkit.data import DataConfig
from mpqkit.engine import RunConfig, evaluate, finetune, load_checkpoint_model, load_config, train
from mpqkit.engine.checkpoint import read_checkpoint
from mpqkit.errors import ConfigError


def tiny_cfg(folder, out, **kw):
    cfg = RunConfig(model="resnet20", epochs=2, out=str(out), save_every_min=0.0)
    cfg.data = DataConfig(name=f"imagefolder:{folder}", batch_size=8, eval_batch_size=16,
                          input_size=32)
    cfg.optim.lr = 0.05
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_train_finetune_eval(tiny_folder, tmp_path):
    res = train(tiny_cfg(tiny_folder, tmp_path / "fp"))
    run = res.run_dir
    for name in ("config.yaml", "metrics.csv", "log.txt", "best.safetensors", "best.json",
                 "last.safetensors", "last.json"):
        assert (run / name).is_file(), name
    assert "CPU allocator: " in (run / "log.txt").read_text()  # what the run ran with
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    accs = [float(r["eval_acc"]) for r in rows]
    assert res.final_acc == pytest.approx(accs[-1]) and res.best_acc == pytest.approx(max(accs))
    assert res.best_epoch == accs.index(max(accs)) + 1
    best = json.loads((run / "best.json").read_text())
    assert best["epoch"] == res.best_epoch
    cfg_back = load_config(RunConfig, run / "config.yaml")
    assert cfg_back.epochs == 2 and cfg_back.data.batch_size == 8

    ft = finetune(tiny_cfg(tiny_folder, tmp_path / "qat", epochs=1, policy="w4a4",
                           weights=str(run / "best.safetensors"), kd_alpha=0.5))
    pol = json.loads((ft.run_dir / "policy.json").read_text())
    assert pol["layers"]["layer1.0.conv1"]["w_bits"] == 4
    assert pol["layers"]["conv1"]["w_bits"] == 8
    model, meta = load_checkpoint_model(ft.run_dir / "best.safetensors")
    assert meta["policy"]["layers"]["fc"]["a_bits"] == 8
    assert model.layer1[0].conv1.w_bits == 4 and bool(model.layer1[0].conv1.aq.initialized)
    res = evaluate(ft.run_dir / "best.safetensors",
                   DataConfig(name=f"imagefolder:{tiny_folder}", input_size=32))
    assert res["n"] == 32 and res["bitops"] == ft.policy.complexity().bitops
    assert abs(res["top1"] - ft.best_acc) < 1e-6


def test_finetune_needs_weights_and_policy(tiny_folder, tmp_path):
    with pytest.raises(ConfigError, match="--weights"):
        finetune(tiny_cfg(tiny_folder, tmp_path / "a", policy="w4a4"))
    with pytest.raises(ConfigError, match="needs a policy"):
        finetune(tiny_cfg(tiny_folder, tmp_path / "b", weights="none"))


def test_overwrite_protection(tiny_folder, tmp_path):
    train(tiny_cfg(tiny_folder, tmp_path / "r", epochs=1))
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        train(tiny_cfg(tiny_folder, tmp_path / "r", epochs=1))
    res = train(tiny_cfg(tiny_folder, tmp_path / "r", epochs=1, overwrite=True))
    assert len(res.metrics) == 1


def test_resume_of_a_finished_run_changes_nothing(tiny_folder, tmp_path):
    a = train(tiny_cfg(tiny_folder, tmp_path / "done", epochs=1))
    before, _ = read_checkpoint(a.run_dir / "last.safetensors")
    b = train(tiny_cfg(tiny_folder, tmp_path / "done", resume=True))
    after, _ = read_checkpoint(b.run_dir / "last.safetensors")
    assert b.final_acc == pytest.approx(a.final_acc)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("rng/"))


def test_checkpoint_files_follow_the_umask_not_0600(tmp_path):
    import stat

    from mpqkit import runio
    from mpqkit.engine.checkpoint import save_checkpoint
    from mpqkit.models import build_model

    st = save_checkpoint(tmp_path / "c", build_model("resnet20"), {"model": "resnet20"})
    # safetensors itself creates 0600 files; the run folder's files get 0666 less the umask
    assert stat.S_IMODE(st.stat().st_mode) == runio._MODE
    assert stat.S_IMODE(st.with_suffix(".json").stat().st_mode) == runio._MODE


def test_finetune_with_asga_as_an_optimizer_choice(tiny_folder, tmp_path):
    fp = train(tiny_cfg(tiny_folder, tmp_path / "fp", epochs=1))
    cfg = tiny_cfg(tiny_folder, tmp_path / "asga", epochs=1, policy="w4a4",
                   weights=str(fp.run_dir / "best.safetensors"))
    cfg.optim.optimizer = "asga"
    cfg.optim.__post_init__()
    res = finetune(cfg)
    last = json.loads((res.run_dir / "last.json").read_text())
    sa = last["extra_state"]["sharpness_aware"]
    assert sa["steps"] == 4 and cfg.optim.rho_min <= sa["rho"] <= cfg.optim.rho_max
    assert "ASGA(SGD)" in (res.run_dir / "log.txt").read_text()
    saved = load_config(RunConfig, res.run_dir / "config.yaml")
    assert saved.optim.sharpness == "asga" and saved.optim.optimizer == "sgd"


def test_unknown_checkpoint_kind_is_refused(tmp_path):
    from mpqkit.engine.checkpoint import save_checkpoint
    from mpqkit.errors import CheckpointError
    from mpqkit.models import build_model

    save_checkpoint(tmp_path / "c", build_model("resnet20"),
                    {"model": "resnet20", "num_classes": 10, "kind": "hypernet"})
    with pytest.raises(CheckpointError, match="kind 'hypernet'.*known: model, supernet"):
        load_checkpoint_model(tmp_path / "c.safetensors")


def test_input_size_is_the_training_resolution(tiny_folder, tmp_path):
    """--input-size 48 trains on 48 px images, the size the BitOps and the checkpoint state
    (not on the folder's 32 px while the policy states 48); a different data.input_size is a
    one-line error."""
    from mpqkit.engine.config import sync_input_size

    cfg = tiny_cfg(tiny_folder, tmp_path / "fp", epochs=1, max_steps_per_epoch=1, input_size=48)
    with pytest.raises(ConfigError, match="input_size=48 .* differs from data.input_size=32"):
        sync_input_size(cfg)
    cfg.data.input_size = None
    res = train(cfg)
    assert load_config(RunConfig, res.run_dir / "config.yaml").data.input_size == 48
    assert "48px" in (res.run_dir / "log.txt").read_text()
    ev = evaluate(res.run_dir / "best.safetensors", {"name": f"imagefolder:{tiny_folder}"})
    assert ev["n"] == 32
