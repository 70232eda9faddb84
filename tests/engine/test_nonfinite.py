"""No silent NaN: a non-finite gradient or weight stops the run naming the layer, nothing
non-finite is ever written, and a checkpoint holding NaN is refused by eval."""

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from mpqkit.data import DataConfig
from mpqkit.engine import RunConfig, evaluate, train
from mpqkit.engine.checkpoint import read_checkpoint, save_checkpoint
from mpqkit.errors import CheckpointError, NonFiniteError
from mpqkit.models import build_model

POISON = '''
import torch
from torch import nn

STATE = {"calls": 0, "at": 3}


class _Poison(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        STATE["calls"] += 1
        return g * float("nan") if STATE["calls"] == STATE["at"] else g


class Poisoned(nn.Module):
    def forward(self, x):
        return _Poison.apply(x)


class Boom(nn.Module):
    """Finite but huge activations from the 3rd training forward on: a diverged layer."""

    def forward(self, x):
        if self.training:
            STATE["calls"] += 1
        return x * 1e25 if self.training and STATE["calls"] >= STATE["at"] else x


def overflowing(num_classes=10):
    # BatchNorm's variance of 1e25-sized values overflows to inf; its output, (x - mean) / inf,
    # stays finite, and so does the loss: only the running statistics show the divergence
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Boom(), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def tiny(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         Poisoned(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
'''


def _cfg(folder, out, model, **kw):
    cfg = RunConfig(model=model, out=str(out), save_every_min=0.0, **{"epochs": 2, **kw})
    cfg.data = DataConfig(name=f"imagefolder:{folder}", batch_size=8, eval_batch_size=16,
                          input_size=32)
    cfg.optim.lr = 0.01
    return cfg


def test_nonfinite_gradient_stops_the_run_naming_the_layer(tiny_folder, tmp_path, monkeypatch):
    (tmp_path / "poisoned_models.py").write_text(POISON)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("poisoned_models", None)
    # 4 steps per epoch: the 3rd backward of epoch 2 (its step 2) turns NaN
    import poisoned_models

    poisoned_models.STATE.update(calls=0, at=4 + 3)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteError) as err:
        train(_cfg(tiny_folder, run_dir, "poisoned_models:tiny"))
    msg = str(err.value)
    assert "\n" not in msg
    assert "at epoch 2 step 2" in msg
    # NaN starts in the backward of layer 3 (the poison, no parameters): BatchNorm layer 1 is
    # the first with non-finite gradients seen from the output; the layers after it keep finite
    assert "non-finite gradients in 4 parameter(s), starting at layer 1 (1." in msg
    assert "last good one" in msg
    tensors, meta = read_checkpoint(run_dir / "last.safetensors")
    assert meta["epoch"] == 1 and meta["extra_state"]["step"] == 0
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert json.loads((run_dir / "best.json").read_text())["epoch"] == 1


def test_a_weight_that_overflows_under_a_finite_loss_stops_the_run(tiny_folder, tmp_path,
                                                                  monkeypatch):
    (tmp_path / "overflow_models.py").write_text(POISON)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("overflow_models", None)
    import overflow_models

    overflow_models.STATE.update(calls=0, at=3)
    with pytest.raises(NonFiniteError, match=r"overflowing run diverged at epoch 1 step 2 \(1 "
                                             r"tensor.*first in layer 2 \(2.running_var\)"):
        train(_cfg(tiny_folder, tmp_path / "run", "overflow_models:overflowing", epochs=1))
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_save_refuses_nonfinite_tensors(tmp_path):
    m = build_model("resnet20")
    with torch.no_grad():
        m.layer2[0].bn1.running_var[3] = float("inf")
    with pytest.raises(CheckpointError, match="1 tensor.*NaN or inf.*layer2.0.bn1.running_var"):
        save_checkpoint(tmp_path / "c", m, {"model": "resnet20", "num_classes": 10})
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def test_eval_of_a_checkpoint_with_nan_is_an_error(tiny_folder, tmp_path):
    m4 = build_model("resnet20", num_classes=4)
    save_checkpoint(tmp_path / "c", m4, {"model": "resnet20", "num_classes": 4})
    sd = {k: v.clone() for k, v in m4.state_dict().items()}
    sd["layer1.0.conv2.weight"][0, 0, 0, 0] = float("nan")
    save_file(sd, str(tmp_path / "c.safetensors"))  # as a diverged run of mpqkit 0.1 wrote it
    data = DataConfig(name=f"imagefolder:{tiny_folder}", input_size=32)
    with pytest.raises(CheckpointError, match="c.safetensors: 1 tensor.*NaN or inf.*"
                                              "layer1.0.conv2.weight") as err:
        evaluate(tmp_path / "c.safetensors", data)
    assert "\n" not in str(err.value)


def test_eval_of_a_model_with_nonfinite_outputs_is_an_error(tiny_folder, tmp_path):
    from mpqkit.data import build_data, make_loader
    from mpqkit.engine import evaluate_model

    m = build_model("resnet20", num_classes=4)
    with torch.no_grad():
        m.bn1.running_var.fill_(-1.0)  # finite, but sqrt(-1) -> NaN outputs
    bundle = build_data(DataConfig(name=f"imagefolder:{tiny_folder}", input_size=32))
    with pytest.raises(NonFiniteError, match="test loss is nan.*not finite"):
        evaluate_model(m, make_loader(bundle.test, 16, train=False), torch.device("cpu"),
                       desc="test")
