"""The search config: the method's own options, and configs written by mpqkit 0.1."""

from dataclasses import dataclass, field

import pytest
import yaml

from mpqkit.errors import ConfigError
from mpqkit.search import SearchConfig, get_method, load_search_config, method_specs
from mpqkit.search.registry import _REGISTRY, register_method


def test_every_method_owns_a_config_module():
    names = {m.name for m in method_specs()}
    assert names >= {"asga", "edmips", "gmpq", "seam", "hawq", "uniform", "random"}
    for m in method_specs():
        assert m.description, m.name
        assert m.impl.__module__ == f"mpqkit.search.methods.{m.name}", m.name


def test_options_are_the_methods_own_typed_config():
    cfg = load_search_config(None, {"method": "gmpq", "options.attr_weight": 10})
    assert type(cfg.options).__name__ == "GMPQConfig" and cfg.options.attr_weight == 10.0
    assert cfg.options.teacher_epochs == 5
    with pytest.raises(ConfigError, match=r"options \(edmips\).*unknown option.*attr_weight"):
        load_search_config(None, {"method": "edmips", "options.attr_weight": 10})
    with pytest.raises(ConfigError, match="expected a number"):
        load_search_config(None, {"method": "seam", "options.seam_weight": "x"})
    assert type(SearchConfig(method="hawq").method_options()).__name__ == "HawqConfig"


def test_a_new_method_needs_only_its_registration():
    @dataclass
    class Cfg:
        strength: float = field(default=2.0, metadata={"help": "how strong"})

    try:
        register_method("test-new", config=Cfg, description="a test method")(lambda ctx: None)
        cfg = load_search_config(None, {"method": "test-new", "options.strength": 3})
        assert cfg.options == Cfg(3.0) and get_method("test-new").description == "a test method"
    finally:
        _REGISTRY.pop("test-new", None)


def test_a_config_of_mpqkit_0_1_still_loads(tmp_path):
    old = {"model": "resnet20", "method": "gmpq", "budget": "w3a3", "lr_w": 0.2,
           "lr_alpha": 0.02, "momentum": 0.8, "weight_decay": 1e-4, "schedule": "constant",
           "step_size": 5, "rho0": 0.07, "adaptive": False, "perturb_logits": False,
           "teacher": None, "teacher_epochs": 3, "attr_weight": 20.0, "attr_power": 3.0,
           "seam_weight": 1.0, "seam_margin": 0.0, "hawq_batches": 4, "hawq_iters": 16,
           "options": {}, "data": {"batch_size": 64}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    cfg = load_search_config(path)
    assert cfg.optim.lr == 0.2 and cfg.optim.momentum == 0.8 and cfg.optim.schedule == "constant"
    assert cfg.optim.rho0 == 0.07 and cfg.optim.adaptive is False and cfg.lr_alpha == 0.02
    assert cfg.arch_optimizer == "sgd"  # as 0.1 searched
    assert cfg.options.teacher_epochs == 3 and cfg.options.attr_weight == 20.0
    assert cfg.data.batch_size == 64
    old.update(method="hawq", options={"hawq_batch_size": 8, "fp_epochs": 2})
    path.write_text(yaml.safe_dump(old))
    cfg = load_search_config(path)
    assert cfg.options.hawq_batch_size == 8 and cfg.options.teacher_epochs == 2


def test_flags_override_a_migrated_0_1_config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"method": "asga", "budget": "w3a3", "lr_w": 0.2}))
    cfg = load_search_config(path, {"optim.lr": 0.3, "arch_optimizer": "adam"})
    assert cfg.optim.lr == 0.3 and cfg.arch_optimizer == "adam"
    assert load_search_config(path).arch_optimizer == "sgd"
