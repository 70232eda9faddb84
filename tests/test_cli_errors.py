"""Every user error is one line on stderr, exit status 2, no traceback."""

import json

import pytest
import torch

from mpqkit import Policy, build_model
from mpqkit.cli import main
from mpqkit.engine.checkpoint import save_checkpoint


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mpqkit: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def r32_policy(tmp_path):
    return Policy.uniform(build_model("resnet32"), 4, 4, 32).save(tmp_path / "r32.json")


def test_unknown_model(capsys):
    assert_one_line_error(*run_cli(capsys, "info", "--model", "resnet21")[::2], "unknown model")


def test_unknown_dataset(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "train", "--data", "mnist", "--out", tmp_path / "r")
    assert_one_line_error(rc, err, "mnist", "cifar10")


def test_missing_data_folder(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "train", "--data", "cifar10", "--data-dir", tmp_path / "nope",
                         "--out", tmp_path / "r")
    assert_one_line_error(rc, err, "nope")


def test_no_data_folder_given(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("MPQKIT_DATA_DIR", raising=False)
    rc, _, err = run_cli(capsys, "train", "--data", "cifar10", "--out", tmp_path / "r")
    assert_one_line_error(rc, err, "--data-dir", "MPQKIT_DATA_DIR")


def test_empty_data_folder(capsys, tmp_path):
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "a").mkdir(parents=True)
    rc, _, err = run_cli(capsys, "train", "--data", f"imagefolder:{tmp_path / 'empty'}",
                         "--out", tmp_path / "r")
    assert_one_line_error(rc, err, "empty")


def test_policy_that_does_not_fit(capsys, r32_policy):
    rc, _, err = run_cli(capsys, "info", "--model", "resnet20", "--policy", r32_policy)
    assert_one_line_error(rc, err, "does not fit", "layer1.3.conv1", "mpqkit transfer")


@pytest.mark.parametrize("spec", ["w9a4", "w4a1", "w33a4"])
def test_bits_outside_range_spec(capsys, spec):
    rc, _, err = run_cli(capsys, "info", "--model", "resnet20", "--policy", spec)
    assert_one_line_error(rc, err, "outside the supported range", "2..8")


def test_bits_outside_range_in_json(capsys, tmp_path):
    p = Policy.uniform(build_model("resnet20"), 4, 4, 32).to_dict()
    p["layers"]["layer1.0.conv1"]["w_bits"] = 1
    (tmp_path / "p.json").write_text(json.dumps(p))
    rc, _, err = run_cli(capsys, "info", "--model", "resnet20", "--policy", tmp_path / "p.json")
    assert_one_line_error(rc, err, "layer1.0.conv1", "w_bits=1")


def test_malformed_policy_json(capsys, tmp_path):
    (tmp_path / "bad.json").write_text('{"layers": {"conv1": {"w_bits": 4, ')
    rc, _, err = run_cli(capsys, "info", "--model", "resnet20", "--policy", tmp_path / "bad.json")
    assert_one_line_error(rc, err, "not valid JSON")


def test_missing_policy_file(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "info", "--model", "resnet20", "--policy", tmp_path / "x.json")
    assert_one_line_error(rc, err, "does not exist")


def test_corrupt_checkpoint(capsys, tmp_path):
    (tmp_path / "best.safetensors").write_bytes(b"\x00garbage" * 10)
    rc, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path / "best.safetensors")
    assert_one_line_error(rc, err, "corrupt")


def test_mismatched_checkpoint(capsys, tmp_path):
    save_checkpoint(tmp_path / "best", build_model("resnet20"),
                    {"model": "resnet32", "num_classes": 10, "dataset": "cifar10"})
    rc, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path / "best.safetensors")
    assert_one_line_error(rc, err, "does not match", "missing")


def test_missing_checkpoint(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path / "none.safetensors")
    assert_one_line_error(rc, err, "does not exist")


def test_overwrite_refused(capsys, tmp_path, tiny_folder):
    args = ["train", "--model", "resnet20", "--data", f"imagefolder:{tiny_folder}", "--epochs",
            "1", "--max-steps-per-epoch", "1", "--batch-size", "4", "--out", tmp_path / "run"]
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0, err
    rc, _, err = run_cli(capsys, *args)
    assert_one_line_error(rc, err, "already holds a run", "--overwrite")
    assert run_cli(capsys, *args, "--overwrite")[0] == 0


def test_bad_config_file(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 2\nlearning_rate: 0.1\n")
    rc, _, err = run_cli(capsys, "train", "--config", tmp_path / "c.yaml")
    assert_one_line_error(rc, err, "unknown option", "learning_rate")
    (tmp_path / "d.yaml").write_text("epochs: two\n")
    rc, _, err = run_cli(capsys, "train", "--config", tmp_path / "d.yaml")
    assert_one_line_error(rc, err, "epochs", "integer")


def test_resume_without_a_run(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "train", "--resume", "--out", tmp_path / "nothing")
    assert_one_line_error(rc, err, "nothing to resume")


def test_info_json_and_table(capsys):
    rc, out, _ = run_cli(capsys, "info", "--model", "resnet18", "--input-size", "224", "--json")
    d = json.loads(out)
    assert rc == 0 and d["totals"]["macs"] == 1_814_073_344 and len(d["layers"]) == 21
    rc, out, _ = run_cli(capsys, "info", "--model", "resnet20", "--policy", "w4a4")
    assert "BitOps" in out and "layer3.2.conv2" in out and "at 32x32" in out
    assert torch.get_num_threads() >= 1
