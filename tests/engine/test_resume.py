"""A run killed mid-epoch and resumed ends with the same weights as an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mpqkit.engine.checkpoint import read_checkpoint

SLOW_MODEL = '''
import time
from torch import nn
from mpqkit.models.cifar import CifarResNet

class Slow(CifarResNet):
    def forward(self, x):
        if self.training:
            time.sleep(0.15)  # makes the kill land mid-epoch; does not change the arithmetic
        return super().forward(x)

def slow_resnet8(num_classes=10):
    return Slow(8, num_classes)
'''


def _cmd(folder, out, extra=()):
    return [sys.executable, "-m", "mpqkit", "train", "--model", "slowmodels:slow_resnet8",
            "--data", f"imagefolder:{folder}", "--epochs", "2", "--batch-size", "4",
            "--lr", "0.05", "--out", str(out), "--save-every-min", "0.00001", *extra]


@pytest.mark.slow
def test_kill_mid_epoch_then_resume_matches_uninterrupted(tiny_folder, tmp_path):
    (tmp_path / "slowmodels.py").write_text(SLOW_MODEL)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    full = subprocess.run(_cmd(tiny_folder, tmp_path / "full"), env=env, capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(tiny_folder, run), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        meta = run / "last.json"
        if meta.is_file():
            try:
                ex = __import__("json").loads(meta.read_text())["extra_state"]
            except (ValueError, KeyError):
                ex = None
            if ex and ex["epoch"] == 1 and ex["step"] >= 2:  # inside the second epoch
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at = (ex["epoch"], ex["step"])
                break
        time.sleep(0.02)
    assert killed_at is not None, "the run was not caught mid-epoch"

    resumed = subprocess.run(_cmd(tiny_folder, run, ["--resume"]), env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed" in (run / "log.txt").read_text()
    a, _ = read_checkpoint(tmp_path / "full" / "last.safetensors")
    b, _ = read_checkpoint(run / "last.safetensors")
    for k in a:
        if not k.startswith("rng/"):
            assert torch.equal(a[k], b[k]), k
    ma = (tmp_path / "full" / "metrics.csv").read_text()
    mb = (run / "metrics.csv").read_text()
    strip = lambda t: [r.split(",")[:6] for r in t.splitlines()]  # noqa: E731 (drop timings)
    assert strip(ma) == strip(mb)
