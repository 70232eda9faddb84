"""Packed integer checkpoints: bit packing, bit-identical round trip, size against the policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mpqkit.complexity import profile_model
from mpqkit.engine.config import to_dict
from mpqkit.errors import CheckpointError
from mpqkit.export import ExportError
from mpqkit.export.inspection import format_inspection, inspect_file
from mpqkit.export.packed import (
    load_packed,
    pack_bits,
    packed_report,
    read_packed_header,
    save_packed,
    unpack_bits,
)
from mpqkit.export.verify import verify_packed
from mpqkit.models import build_model
from mpqkit.policy import Policy
from mpqkit.quant import QuantConfig, calibrate, quantize_model

torch.set_num_threads(1)

CYCLE = [(2, 2), (3, 3), (4, 4), (6, 6), (8, 8), (4, 2), (2, 4), (3, 6), (6, 3), (5, 5), (7, 7)]


def mixed(weight_method: str = "lsq", act_method: str = "lsq", per_channel: bool = False,
          overrides: dict[str, tuple[int, int]] | None = None
          ) -> tuple[torch.nn.Module, dict]:
    """A calibrated mixed-precision resnet20 and its checkpoint metadata."""
    torch.manual_seed(0)
    model = build_model("resnet20")
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 32, 32))
    model.eval()
    names = list(profile_model(model, 32))
    bits = {n: CYCLE[i % len(CYCLE)] for i, n in enumerate(names)}
    bits[names[0]], bits[names[-1]] = (8, 8), (32, 32)
    bits.update(overrides or {})
    policy = Policy.from_bits(model, bits, 32, model_name="resnet20")
    cfg = QuantConfig(weight_method=weight_method, act_method=act_method, per_channel=per_channel)
    q = quantize_model(model, policy, cfg)
    calibrate(q, torch.randn(8, 3, 32, 32))
    meta = {"model": "resnet20", "num_classes": 10, "input_size": 32, "dataset": "cifar10",
            "policy": policy.to_dict(), "quant": to_dict(cfg)}
    return q.eval(), meta


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_round_trip(bits: int) -> None:
    rng = np.random.default_rng(bits)
    v = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=1001)
    data = pack_bits(v, bits)
    assert len(data) == -(-1001 * bits // 8)
    np.testing.assert_array_equal(unpack_bits(data, bits, 1001), v)


def test_bit_order_is_little_endian_twos_complement() -> None:
    assert pack_bits(np.array([1, -1]), 4) == bytes([0xF1])
    assert pack_bits(np.array([1, -1, 0, -2]), 2) == bytes([0b10001101])
    assert pack_bits(np.array([3, -3, 1]), 3) == bytes([0b01101011, 0b0])
    for out_of_range in (16, -9):
        with pytest.raises(ValueError):
            pack_bits(np.array([out_of_range]), 4)


@pytest.mark.parametrize("wm,am,pc", [("lsq", "lsq", False), ("maxabs", "pact", True),
                                      ("dorefa", "lsq", True), ("lsq", "pact", True)])
def test_round_trip_is_bit_identical(tmp_path: Path, wm: str, am: str, pc: bool) -> None:
    model, meta = mixed(wm, am, pc)
    path = tmp_path / "m.mpq"
    save_packed(model, path, meta)
    loaded = load_packed(path)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    res = verify_packed(model, path, [(x, torch.zeros(8, dtype=torch.long))])
    assert res["identical_logits"] == 100.0 and res["max_logit_diff"] == 0.0


def test_size_matches_the_policy(tmp_path: Path) -> None:
    model, meta = mixed()
    path = tmp_path / "m.mpq"
    rep = save_packed(model, path, meta)
    policy_bytes = Policy.from_dict(meta["policy"]).complexity().size_mb * 1e6
    assert rep == packed_report(path)
    assert rep["file_bytes"] == path.stat().st_size
    assert abs(rep["weight_bytes"] - policy_bytes) <= 0.02 * policy_bytes
    assert rep["file_bytes"] == rep["weight_bytes"] + rep["overhead_bytes"]
    # "small header": the compressed JSON header stays under 4 KB for resnet20, and the whole
    # overhead (header + scales + BatchNorm/bias/quantizer tensors) under 16 KB.
    assert rep["header_bytes"] < 4096 and rep["overhead_bytes"] < 16384
    assert rep["overhead_bytes"] == (rep["header_bytes"] + rep["scale_bytes"]
                                     + rep["other_float_bytes"])


def test_bits_are_packed(tmp_path: Path) -> None:
    # layer1.0.conv1 and layer1.0.conv2 have the same shape (16x16x3x3)
    model, meta = mixed(overrides={"layer1.0.conv1": (2, 4), "layer1.0.conv2": (8, 4)})
    path = tmp_path / "m.mpq"
    save_packed(model, path, meta)
    header, _ = read_packed_header(path)
    nbytes = {e["name"]: e["nbytes"] for e in header["tensors"]}
    assert nbytes["layer1.0.conv2.weight"] == 16 * 16 * 9
    assert nbytes["layer1.0.conv1.weight"] * 4 == nbytes["layer1.0.conv2.weight"]
    rep = inspect_file(path)
    by = {r["name"]: r for r in rep["layers"]}
    assert by["layer1.0.conv1"]["w_bits"] == 2 and by["layer1.0.conv2"]["w_bits"] == 8
    assert rep["matches_policy"] and "all 20 layers match" in format_inspection(rep)


def test_corrupt_files_give_one_line_errors(tmp_path: Path) -> None:
    model, meta = mixed()
    path = tmp_path / "m.mpq"
    save_packed(model, path, meta)
    data = path.read_bytes()
    bad = tmp_path / "bad.mpq"
    bad.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="not a valid packed") as e:
        load_packed(bad)
    assert "\n" not in str(e.value)
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum"):
        load_packed(bad)
    bad.write_bytes(b"MPQKPACK" + b"\x01\x00\x00\x00\xff\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="header"):
        load_packed(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_packed(tmp_path / "none.mpq")


def test_fp_model_cannot_be_packed(tmp_path: Path) -> None:
    model = build_model("resnet20").eval()
    with pytest.raises(ExportError, match="no policy"):
        save_packed(model, tmp_path / "m.mpq", {"model": "resnet20", "num_classes": 10,
                                                "policy": None})
