import json

import pytest

from mpqkit import Policy, build_model
from mpqkit.errors import ConfigError, PolicyError
from mpqkit.policy import parse_uniform


@pytest.fixture(scope="module")
def r20():
    return build_model("resnet20")


def test_uniform_policy_conventions(r20):
    p = Policy.uniform(r20, 4, 4, 32, model_name="resnet20")
    fixed = [n for n, lp in p.layers.items() if lp.fixed]
    assert fixed == ["conv1", "fc"]
    assert p.layers["conv1"].w_bits == 8 and p.layers["layer1.0.conv1"].a_bits == 4
    c = p.complexity()
    expected = sum(lp.macs * lp.w_bits * lp.a_bits for lp in p.layers.values())
    assert c.bitops == expected
    fp = Policy.uniform(r20, 4, 4, 32, first_last="fp").complexity()
    assert fp.bitops == expected - 8 * 8 * (p.layers["conv1"].macs + p.layers["fc"].macs)
    assert fp.fp_macs == p.layers["conv1"].macs + p.layers["fc"].macs


def test_json_round_trip(tmp_path, r20):
    p = Policy.uniform(r20, 3, 4, 32, model_name="resnet20", provenance={"method": "manual"})
    path = p.save(tmp_path / "p.json")
    d = json.loads(path.read_text())
    assert d["format"] == "mpqkit.policy" and d["version"] == 1
    assert set(d["layers"]["layer1.0.conv1"]) >= {"w_bits", "a_bits", "macs", "params"}
    assert d["complexity"]["bitops"] == p.complexity().bitops
    q = Policy.load(path)
    assert q.bits() == p.bits() and q.input_size == (32, 32)
    q.validate(r20)


def test_hand_written_policy(tmp_path, r20):
    layers = {n: {"w_bits": 4, "a_bits": 4} for n in Policy.uniform(r20, 4, 4, 32).layers}
    path = tmp_path / "hand.json"
    path.write_text(json.dumps({"version": 1, "layers": layers}))
    p = Policy.load(path)
    p.validate(r20)
    assert p.retarget(r20, 32).complexity().bitops > 0


def test_validate_names_every_missing_and_extra(r20):
    p = Policy.uniform(r20, 4, 4, 32)
    del p.layers["layer2.0.conv1"]
    p.layers["head.proj"] = p.layers["fc"]
    with pytest.raises(PolicyError, match=r"missing.*layer2\.0\.conv1.*not in the model.*head"):
        p.validate(r20)


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"),
    ('{"version": 99, "layers": {"a": {"w_bits": 4, "a_bits": 4}}}', "version 99"),
    ('{"layers": {}}', "no 'layers'"),
    ('{"layers": {"conv1": {"w_bits": 9, "a_bits": 4}}}', "outside the supported range"),
    ('{"layers": {"conv1": {"w_bits": 4}}}', "needs both"),
    ('[1, 2]', "not a JSON object"),
])
def test_malformed_policies(text, match):
    with pytest.raises(PolicyError, match=match):
        Policy.from_json(text)


def test_parse_uniform():
    assert parse_uniform("w4a8") == (4, 8)
    with pytest.raises(ConfigError):
        parse_uniform("4bit")
    with pytest.raises(PolicyError):
        parse_uniform("w9a4")


def test_transfer_between_cifar_and_imagenet_resnet18():
    src = Policy.uniform(build_model("resnet18_cifar"), 4, 4, 32, model_name="resnet18_cifar")
    tgt = src.retarget(build_model("resnet18", num_classes=200), 224, "resnet18")
    assert tgt.bits() == src.bits()
    assert tgt.complexity().macs > 3 * src.complexity().macs / 2  # recomputed at 224
