"""Every config field has a command-line flag; a newly registered method gets its flags.

The flags are found by ``dest`` in the parser's actions: ``model``, ``optim.lr``,
``options.teacher``. Nothing is run.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import pytest

from mpqkit.cli import build_parser

# Fields that are deliberately not flags: sections, reached by their own ``section.*`` flags
# (``optim`` and ``options`` are checked field by field below; ``data`` and ``quant`` have their
# hand-written flags), and ``options`` itself (the method's config, one flag per field).
SECTIONS = {"optim", "data", "quant", "options"}


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError("the parser has no subcommands")


def _dests(command: str) -> set[str]:
    return {a.dest for a in _subparser(build_parser(), command)._actions}


def _missing(cls: type, prefix: str, dests: set[str], skip: set[str] = frozenset()) -> list[str]:
    return [f"{prefix}{f.name}" for f in dataclasses.fields(cls)
            if f.name not in skip and f"{prefix}{f.name}" not in dests]


def test_search_flags_cover_search_config():
    from mpqkit.optim.factory import OptimConfig
    from mpqkit.search.config import SearchConfig
    from mpqkit.search.registry import method_specs

    dests = _dests("search")
    missing = _missing(SearchConfig, "", dests, SECTIONS) + _missing(OptimConfig, "optim.", dests)
    for spec in method_specs():
        if spec.config is not None:
            missing += _missing(spec.config, "options.", dests)
    assert not missing, f"mpqkit search has no flag for {sorted(set(missing))}"


def test_finetune_flags_cover_run_config():
    from mpqkit.engine.config import RunConfig
    from mpqkit.optim.factory import OptimConfig

    dests = _dests("finetune")
    missing = _missing(RunConfig, "", dests, SECTIONS) + _missing(OptimConfig, "optim.", dests)
    assert not missing, f"mpqkit finetune has no flag for {missing}"


def test_shared_option_has_one_flag_naming_its_methods():
    from mpqkit.search.registry import method_specs

    owners: dict[str, list[str]] = {}
    for spec in method_specs():
        for f in dataclasses.fields(spec.config) if spec.config else ():
            owners.setdefault(f.name, []).append(spec.name)
    search = _subparser(build_parser(), "search")
    for name, methods in owners.items():
        actions = [a for a in search._actions if a.dest == f"options.{name}"]
        assert len(actions) == 1, name
        assert actions[0].help.startswith(", ".join(methods) + ":"), actions[0].help
        assert actions[0].default is None
    method_help = next(a.help for a in search._actions if a.dest == "method")
    for spec in method_specs():
        assert f"{spec.name}:" in method_help


def test_optim_flags_parse_into_the_optim_section():
    parser = build_parser()
    args = parser.parse_args(["finetune", "--optimizer", "asga", "--betas", "0.8,0.99",
                              "--no-adaptive", "--rho-max", "0.2"])
    assert vars(args)["optim.optimizer"] == "asga"
    assert vars(args)["optim.betas"] == [0.8, 0.99]
    assert vars(args)["optim.adaptive"] is False
    assert vars(args)["optim.rho_max"] == 0.2
    assert vars(args)["optim.lr"] is None  # not given: the config's value stays
    args = parser.parse_args(["search", "--lr-w", "0.05", "--schedule", "cosine"])
    assert vars(args)["optim.lr"] == 0.05 and vars(args)["optim.schedule"] == "cosine"
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--betas", "0.9"])


@dataclass
class _ToyConfig:
    toy_strength: float = field(default=0.5, metadata={"help": "strength of the toy term"})
    toy_steps: int | None = None
    toy_flag: bool = False
    seed: int = 1  # --seed is taken by the run flags: the flag becomes --options-seed


def test_a_registered_method_gets_its_flags():
    from mpqkit.search import registry

    registry.method_specs()  # load the built-in methods first
    registry.register_method("toy-cli-test", config=_ToyConfig, description="a toy")(
        lambda ctx: None)
    try:
        search = _subparser(build_parser(), "search")
        by_dest = {a.dest: a for a in search._actions}
        assert {"options.toy_strength", "options.toy_steps", "options.toy_flag"} <= set(by_dest)
        assert by_dest["options.toy_strength"].help.startswith("toy-cli-test: strength")
        assert by_dest["options.seed"].option_strings == ["--options-seed"]
        assert by_dest["seed"].option_strings == ["--seed"]
        assert "toy-cli-test: a toy" in by_dest["method"].help
        args = search.parse_args(["--method", "toy-cli-test", "--toy-strength", "2",
                                  "--toy-steps", "3", "--toy-flag"])
        assert (vars(args)["options.toy_strength"], vars(args)["options.toy_steps"],
                vars(args)["options.toy_flag"]) == (2.0, 3, True)
    finally:
        registry._REGISTRY.pop("toy-cli-test", None)
    assert "options.toy_strength" not in _dests("search")
