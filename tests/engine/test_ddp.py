"""torchrun with 2 CPU processes (gloo) runs a QAT fine-tune; one process needs no launcher."""

import os
import shutil
import subprocess
import sys

import pytest

from mpqkit.data import DataConfig
from mpqkit.engine import RunConfig, train


@pytest.mark.slow
def test_torchrun_two_processes_finetune(tiny_folder, tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable),
                                                        "torchrun")
    cfg = RunConfig(model="resnet20", epochs=1, out=str(tmp_path / "fp"), save_every_min=0)
    cfg.data = DataConfig(name=f"imagefolder:{tiny_folder}", batch_size=8, input_size=32)
    fp = train(cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "mpqkit", "finetune",
           "--model", "resnet20", "--data", f"imagefolder:{tiny_folder}", "--policy", "w4a4",
           "--weights", str(fp.run_dir / "best.safetensors"), "--epochs", "2",
           "--batch-size", "4", "--out", str(tmp_path / "ddp")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    log = (tmp_path / "ddp" / "log.txt").read_text()
    assert "x 2 processes" in log
    # each rank sees half of the 32 training images: 4 steps of 4 images per epoch
    assert "2 epoch(s) x 4 steps" in log
    rows = (tmp_path / "ddp" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and (tmp_path / "ddp" / "best.safetensors").is_file()
