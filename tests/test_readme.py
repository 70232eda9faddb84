"""Every command in README.md runs as shown (parse-level dry run; the cheap ones for real).

The shell commands are taken from the README's code blocks (fenced and indented) and from
inline code that starts with ``mpqkit `` or ``python ``. Each ``mpqkit`` command must parse
with the real CLI parser; each file it reads must be in the repository or written by a command
before it (the run folders, exports, reports and transferred policies each command writes are
tracked); commands that read a dataset need ``MPQKIT_DATA_DIR`` set by an earlier block or
``--data-dir``; ``mpqkit`` itself must be reachable (the venv activated, or ``.venv/bin``).
``info`` and ``transfer`` (on a stand-in for the searched policy) and the Python block run for
real. About 5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mpqkit.cli import build_parser, main
from mpqkit.cli.export import _default_out
from mpqkit.cli.tools import default_sharpness_dir
from mpqkit.report import default_report_dir

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FILE_FLAGS = ("--checkpoint", "--policy", "--config", "--weights", "--teacher")
POLICY_SPEC = re.compile(r"^w\d+a\d+$")
# what the scripts the README runs write (relative to the repository)
SCRIPT_OUTPUTS = {"scripts/demo.sh": ["runs/demo"], "scripts/setup.sh": [".venv"],
                  "scripts/test.sh": [".venv"]}


@dataclass
class Cmd:
    text: str  # as in the README, continuations joined
    block: bool  # from a code block (ordered, files tracked) or inline code (parse only)
    line: int


def _blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each fenced non-Python block and each indented block."""
    out: list[tuple[int, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang, j = lines[i][3:].strip(), i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            if lang in ("", "bash", "sh", "shell", "console"):
                out.append((i + 2, lines[i + 1:j]))
            i = j + 1
            continue
        prev_blank = i == 0 or not lines[i - 1].strip()
        if lines[i].startswith("    ") and prev_blank and not lines[i].lstrip().startswith("-"):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            out.append((i + 1, [ln[4:] for ln in lines[i:j]]))
            i = j
            continue
        i += 1
    return out


def _strip_comment(line: str) -> str:
    return re.sub(r"\s+#.*$", "", line).rstrip()


def readme_commands(text: str) -> list[Cmd]:
    cmds: list[Cmd] = []
    for first, lines in _blocks(text):
        buf, start = "", first
        for k, raw in enumerate(lines):
            line = _strip_comment(raw)
            if not buf:
                start = first + k
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            buf += line
            if buf.strip():
                cmds.append(Cmd(" ".join(buf.split()), True, start))
            buf = ""
    # inline code outside the fenced blocks (blanked, so that offsets keep their line)
    prose = re.sub(r"```.*?```", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S)
    for m in re.finditer(r"`((?:mpqkit|python)\s[^`]+)`", prose):
        words = m.group(1).split()
        mention = len(words) <= (1 if words[0] == "python" else 2)  # ``mpqkit inspect``
        template = any(re.fullmatch(r"[A-Z]{2,}", w) for w in words)  # ``--method NAME``
        if not mention and not template:
            cmds.append(Cmd(" ".join(words), False, prose[:m.start()].count("\n") + 1))
    return cmds


def _mpqkit_argv(text: str) -> list[str] | None:
    """The CLI arguments of an ``mpqkit`` command (also under torchrun / .venv/bin)."""
    argv = shlex.split(text)
    if argv[0] in ("mpqkit", ".venv/bin/mpqkit"):
        return argv[1:]
    if argv[0] == "torchrun" and "-m" in argv and argv[argv.index("-m") + 1] == "mpqkit":
        return argv[argv.index("-m") + 2:]
    return None


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    with contextlib.redirect_stderr(sys.stdout):
        try:
            return parser.parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"does not parse: {exc}") from None


@dataclass
class Files:
    """The files the README's commands have written so far (paths or folder prefixes)."""

    written: list[str] = field(default_factory=list)

    def add(self, path: str | Path) -> None:
        self.written.append(str(Path(path)))

    def have(self, path: str) -> bool:
        p = str(Path(path))
        if (REPO / p).exists():
            return True
        return any(p == w or p.startswith(w + "/") for w in self.written)


def _inputs(argv: list[str], ns: argparse.Namespace) -> list[str]:
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in FILE_FLAGS]
    files = [f for f in files if not POLICY_SPEC.match(f) and f not in ("bundled",)
             and not f.startswith("torchvision")]
    if ns.command == "report":
        files += ns.run_dirs
    if ns.command == "inspect":
        files.append(ns.file)
    return files


def _outputs(ns: argparse.Namespace) -> list[str]:
    cmd = ns.command
    if cmd in ("train", "finetune", "search"):
        return [ns.out] if ns.out else []
    if cmd == "transfer":
        return [ns.out] if ns.out else []
    if cmd == "export":
        return [ns.out or str(_default_out(ns.checkpoint, ns.format, ns.fp))]
    if cmd == "sharpness":
        return [ns.out or str(default_sharpness_dir(ns.checkpoint))]
    if cmd == "report":
        return [ns.out or str(default_report_dir([Path(d) for d in ns.run_dirs]))]
    return []


def _check_python(text: str) -> None:
    """``python SCRIPT ARGS``: the script exists and its argparse parser accepts ARGS."""
    argv = shlex.split(text)[1:]
    script = REPO / argv[0]
    assert script.is_file(), f"{argv[0]} does not exist"

    class Parsed(Exception):
        pass

    orig = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):  # noqa: ANN001, ANN202
        orig(self, args, namespace)
        raise Parsed

    spec = importlib.util.spec_from_file_location(f"_readme_{script.stem}", script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv, sys.path = [str(script), *argv[1:]], [str(script.parent), *sys.path]
    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        spec.loader.exec_module(mod)
        mod.main()
        raise AssertionError(f"{argv[0]} did not parse its arguments")
    except Parsed:
        pass
    except SystemExit as exc:
        raise AssertionError(f"{text}: does not parse (exit {exc.code})") from None
    finally:
        argparse.ArgumentParser.parse_args = orig
        sys.argv, sys.path = old_argv, old_path
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def commands() -> list[Cmd]:
    return readme_commands(README.read_text())


def test_extractor_finds_the_commands(commands):
    texts = [c.text for c in commands]
    assert "bash scripts/demo.sh" in texts and "bash scripts/test.sh" in texts
    assert sum(t.startswith("mpqkit ") for t in texts) >= 10


@dataclass
class State:
    """What the README's blocks have set up so far."""

    files: Files = field(default_factory=Files)
    data_env: bool = False
    activated: bool = False
    folded_runs: list[str] = field(default_factory=list)  # fine-tuned with --fold-bn


def _check_block_cmd(c: Cmd, argv: list[str], ns: argparse.Namespace, st: State) -> list[str]:
    where, problems = f"README.md:{c.line}: {c.text}", []
    if c.text.startswith("mpqkit") and not st.activated:
        problems.append(f"{where}: `mpqkit` is not on the PATH yet: activate the venv "
                        "(source .venv/bin/activate) in a block before it")
    for f in _inputs(argv, ns):
        if not st.files.have(f):
            problems.append(f"{where}: reads {f}, which no command before it writes")
    needs_data = any(a == "--data" or a.startswith("--data=") for a in argv) or (
        ns.command == "train")
    if needs_data and not st.data_env and "--data-dir" not in argv:
        problems.append(f"{where}: needs a data folder: --data-dir or MPQKIT_DATA_DIR set in "
                        "a block before it")
    if ns.command == "finetune" and ns.out and getattr(ns, "quant.fold_bn") is not False:
        st.folded_runs.append(str(Path(ns.out)))
    if ns.command == "export" and ns.format == "packed" and ns.checkpoint and str(
            Path(ns.checkpoint).parent) in st.folded_runs:
        problems.append(f"{where}: the packed format refuses a checkpoint fine-tuned with "
                        "--fold-bn (the default): export a --no-fold-bn run")
    for f in _outputs(ns):
        st.files.add(f)
    return problems


def test_every_mpqkit_command_parses_and_reads_what_was_written(commands):
    st, problems = State(), []
    for c in commands:
        st.data_env |= c.block and "MPQKIT_DATA_DIR=" in c.text
        st.activated |= c.text.startswith("source .venv/bin/activate")
        if c.text.startswith("bash "):
            st.files.written += SCRIPT_OUTPUTS.get(c.text.split()[1], [])
        argv = _mpqkit_argv(c.text)
        if argv is None:
            continue
        try:
            ns = _parse(argv)
        except AssertionError as exc:
            problems.append(f"README.md:{c.line}: {c.text}: {exc}")
            continue
        if c.block:
            problems += _check_block_cmd(c, argv, ns, st)
    assert not problems, "\n".join(problems)


def test_every_python_command_parses(commands):
    problems = []
    for c in commands:
        if c.text.startswith("python "):
            try:
                _check_python(c.text)
            except AssertionError as exc:
                problems.append(f"README.md:{c.line}: {exc}")
    assert not problems, "\n".join(problems)


def test_info_commands_run(commands, capsys):
    infos = [c for c in commands if c.block and c.text.startswith("mpqkit info ")]
    assert infos
    for c in infos:
        assert main(_mpqkit_argv(c.text)) == 0, c.text
    assert "BitOps" in capsys.readouterr().out


def test_transfer_commands_run_on_the_policy_their_search_writes(commands, tmp_path):
    """A stand-in for the searched policy (the search's model and budget, uniform bits)."""
    from mpqkit.models import build_model, default_input_size
    from mpqkit.policy import Policy

    searches: dict[str, list[str]] = {}
    ran = 0
    for c in commands:
        argv = _mpqkit_argv(c.text)
        if not c.block or argv is None:
            continue
        ns = _parse(argv)
        if ns.command == "search" and ns.out:
            searches[str(Path(ns.out) / "policy.json")] = argv
        if ns.command != "transfer" or ns.policy not in searches:
            continue
        s = _parse(searches[ns.policy])
        spec = s.budget if s.budget and POLICY_SPEC.match(s.budget) else "w4a4"
        w, a = (int(v) for v in spec[1:].split("a"))
        model = build_model(s.model)
        pol = Policy.uniform(model, w, a, default_input_size(s.model), model_name=s.model)
        pol.budget = {"kind": "bitops", "value": pol.complexity().bitops, "spec": spec}
        src = tmp_path / f"policy{ran}.json"
        pol.save(src)
        argv = list(argv)
        argv[argv.index("--policy") + 1] = str(src)
        if "--out" in argv:
            argv[argv.index("--out") + 1] = str(tmp_path / f"target{ran}.json")
        assert main(argv) == 0, f"README.md:{c.line}: {c.text}"
        ran += 1
    assert ran, "the README shows no transfer of a searched policy"


def test_python_block_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_mpqkit_entry_point_is_installed_in_the_venv():
    """setup.sh installs the ``mpqkit`` script next to the venv's python (README: activate)."""
    assert "source .venv/bin/activate" in (REPO / "scripts" / "setup.sh").read_text()
    exe = Path(sys.executable).parent / "mpqkit"
    if Path(sys.prefix) == Path(sys.base_prefix):
        pytest.skip("not running in a virtual environment")
    assert exe.is_file(), f"{exe} is missing: run bash scripts/setup.sh"
