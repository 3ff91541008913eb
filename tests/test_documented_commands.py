"""Every command the README and docs/*.md show runs, in its cheapest form: a renamed flag, preset,
config key or make target breaks this test, not a reader's first try.

Commands come from ```sh blocks (every fenced block names its language, so none is missed) and from
inline `...` spans that start with one of this project's programs. Each runs in this process:
- `acpo train|eval ...`, `python sweeps/acpo_sweep.py ...`, `acpo study ...` (also after
  `ray job submit ... --`): with `--dry-run` appended, which validates the config and opens every
  file it names, writing nothing (the working directory is a temporary folder);
- a command whose program has no `--dry-run` (`acpo select`, `acpo assets`, `acpo prompts`, the
  bench scripts, the fault suite), or one that would stage GBs of rehearsal weights
  (`model.rehearsal=true`): up to its argument parser, then its preset and overrides through the
  config schema;
- `make ...`: the targets are rules of the Makefile, the variables it is given are the Makefile's,
  and `STUDY=` names a shipped study that validates.
What cannot run here is listed in SKIP, with the reason; an entry that matches nothing fails.
Placeholders (PATH, NAME, DIR, <name>, ...) are replaced by values in PLACEHOLDERS; `[--opt x]`
is included, and `a|b` tried both ways.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainers.config import PROJECT_ROOT

PAGES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
LANGUAGES = {"sh", "yaml", "python", "text"}  # of fenced blocks; only sh holds commands
INLINE = re.compile(r"(\.venv/bin/)?(acpo|python3?|make) |ray job submit|bench/\S+\.sh ")  # not a bare file name

# Whole words replaced in commands; a list is tried value by value.
PLACEHOLDERS = {
    "PATH": ["checkpoint"],  # acpo eval --dry-run prints the evaluation's config without opening it
    "NAME": ["docs-sweep"],  # a sweep the --resume check finds (made by `resumable`)
    "DIR": ["out"],
    "<demo sweep>": ["demo-sweep"],
    "<name>": ["digits-pefl-masks", "digits-self-perceptual", "digits-t2i-decoupled", "digits-t2i-cas-dm"],  # the studies of that section
}

# Documented commands (their text, whitespace collapsed; a key ending in "..." is a start) that are not run, and why.
SKIP = {
    "acpo select": "names the subcommand in prose; `acpo select --sweep NAME` is checked",
    "acpo prompts select": "names the subcommand in prose; the full command is checked",
    "acpo study --study": "names the option in prose; `acpo study --study my-study.yaml` is checked",
    "acpo eval --json": "names the option in prose; `acpo eval --checkpoint ... --json eval.json` is checked",
    "ray job submit --working-dir .": "names the submission option in prose, no command after `--`",
    "ray job submit": "names the submission in prose",
    ".venv/bin/python bench/<script>.py": "a template for every bench script; those named in the docs are checked",
    "python -c 'import json; from sweeps.study_report import confirmed_figures...":
        "reads the report of two studies that only a run of those studies writes (runs/studies/...)",
}


@dataclass(frozen=True)
class Documented:
    page: str
    line: int
    text: str  # whitespace collapsed (a shell comment stays in it: shlex drops it when the command runs)


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, line of the opening fence, body) of every ``` block."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            language, start, body = lines[i][3:].strip(), i + 1, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append((language, start, "\n".join(body)))
        i += 1
    return blocks


def without_fences(text: str) -> str:
    """The page with every fenced block blanked, its lines kept (so line numbers still count)."""
    return re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.DOTALL | re.MULTILINE)


def shell_lines(body: str, first: int) -> list[tuple[int, str]]:
    """Logical command lines of a shell block: backslash continuations and open quotes joined."""
    out, buffer, start = [], "", None
    for number, line in enumerate(body.split("\n"), first + 1):
        start = number if not buffer else start
        if line.rstrip().endswith("\\"):
            buffer += line.rstrip()[:-1] + " "
            continue
        buffer += line
        try:
            tokens = shlex.split(buffer, comments=True)
        except ValueError:  # a quote still open: the command goes on
            buffer += "\n"
            continue
        if tokens:
            out.append((start, " ".join(buffer.split())))
        buffer = ""
    assert not buffer.strip(), f"an unterminated command: {buffer!r}"
    return out


def documented_commands() -> list[Documented]:
    found = []
    for page in PAGES:
        text, name = page.read_text(), str(page.relative_to(PROJECT_ROOT))
        for language, start, body in fenced_blocks(text):
            if language == "sh":
                found += [Documented(name, number, command) for number, command in shell_lines(body, start)]
        prose = without_fences(text)
        for match in re.finditer(r"`([^`]+)`", prose):
            span = " ".join(match.group(1).split())
            if INLINE.match(span):
                found.append(Documented(name, prose.count("\n", 0, match.start()) + 1, span))
    return found


def skip_reason(command: Documented) -> str | None:
    """The SKIP entry for this command: its whole text, or a key ending in "..." that it starts with."""
    for key, reason in SKIP.items():
        if command.text == key or (key.endswith("...") and command.text.startswith(key[:-3])):
            return reason
    return None


def expand(tokens: list[str]) -> list[list[str]]:
    """`[--seeds 3]` and `[STUDY=x]` included; `bad|faults` inside such a group tried both ways."""
    for i, token in enumerate(tokens):
        if token.startswith("[") and re.match(r"\[(-|[A-Z_]+=)", token):
            j = next(k for k in range(i, len(tokens)) if tokens[k].endswith("]"))
            inner = [token[1:-1]] if i == j else [token[1:], *tokens[i + 1:j], tokens[j][:-1]]
            choices = [[]]
            for part in inner:
                choices = [[*c, alt] for c in choices for alt in (part.split("|") if "|" in part else [part])]
            return [[*tokens[:i], *c, *rest] for c in choices for rest in expand(tokens[j + 1:])]
    return [tokens]


def invocations(command: Documented) -> list[list[str]]:
    texts = [command.text]
    for placeholder, values in PLACEHOLDERS.items():
        pattern = re.escape(placeholder) if placeholder.startswith("<") else rf"\b{placeholder}\b"
        if any(re.search(pattern, text) for text in texts):
            texts = list(dict.fromkeys(re.sub(pattern, value, text) for text in texts for value in values))
    return [variant for text in texts for variant in expand(shlex.split(text, comments=True))]


def runs() -> list:
    params, seen = [], set()
    for command in documented_commands():
        reason = skip_reason(command)
        where = f"{command.page}:{command.line}"
        if reason:
            params.append(pytest.param(where, command.text, None, reason, id=f"{where} {command.text[:60]}"))
            continue
        for argv in invocations(command):
            if tuple(argv) not in seen:
                seen.add(tuple(argv))
                params.append(pytest.param(where, command.text, argv, None, id=f"{where} {' '.join(argv)[:100]}"))
    return params


# Running one.

class Parsed(BaseException):  # not caught by a program's `except Exception`
    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


def parse_only(monkeypatch, main, args: list[str]) -> argparse.Namespace:
    """Run `main(args)` up to its argument parser: a bad flag fails here, nothing after it runs."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        main(args)
    except Parsed as parsed:
        return parsed.namespace
    except SystemExit as exit:
        pytest.fail(f"its arguments do not parse (exit {exit.code})")
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
    pytest.fail("its program never parsed its arguments")


def check_schema(namespace: argparse.Namespace) -> None:
    """The preset and overrides a command names, through the config schema (no file opened, nothing staged)."""
    from sweeps.presets import Preset, apply_overrides, read_preset

    preset = getattr(namespace, "preset", "") or ""
    overrides = getattr(namespace, "overrides", None) or getattr(namespace, "set", None) or []
    if preset:
        Preset.from_dict(apply_overrides(read_preset(preset), list(overrides)))


def rehearsal(args: list[str]) -> bool:
    return any(re.fullmatch(r"model\.rehearsal=(true|True|1)", arg) for arg in args)


def acpo(monkeypatch, args: list[str]) -> None:
    from sweeps import cli

    if args[:1] == ["sweep"]:
        return sweep(monkeypatch, args[1:])
    if args[:1] == ["study"]:
        return study(args[1:])
    if args[:1] in (["train"], ["eval"]) and not rehearsal(args):
        assert cli.main([*args, "--dry-run"]) == 0
        return
    # no --dry-run (select, assets, prompts), or a rehearsal (--dry-run would stage GBs of random weights)
    check_schema(parse_only(monkeypatch, lambda a: cli.build_parser().parse_args(a), args))


def resumable(monkeypatch, args: list[str]) -> None:
    """The sweep a documented `--resume` names, as a started sweep's folder (its id only)."""
    from sweeps.acpo_sweep import main
    from sweeps.driver import sweep_dir
    from sweeps.presets import load
    from trainers.common import layout

    namespace = parse_only(monkeypatch, main, args)
    overrides = [*namespace.overrides, *([f"sweep.name={namespace.name}"] if namespace.name else [])]
    folder = Path(sweep_dir(load(namespace.preset, overrides)[1]))
    folder.mkdir(parents=True)
    Path(layout.sweep_id_file(str(folder))).write_text("documented-resume\n")


def sweep(monkeypatch, args: list[str]) -> None:
    from sweeps.acpo_sweep import main

    if rehearsal(args):
        return check_schema(parse_only(monkeypatch, main, args))
    if "--resume" in args:
        resumable(monkeypatch, args)
    assert main([*args, "--dry-run"]) == 0


def study(args: list[str]) -> None:
    from sweeps.acpo_study import main

    assert main([*args, "--dry-run"]) == 0


def make(args: list[str]) -> None:
    from sweeps.study import read_study

    makefile = (PROJECT_ROOT / "Makefile").read_text()
    rules = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", makefile, flags=re.MULTILINE))
    targets = [arg for arg in args if "=" not in arg and not arg.startswith("-")]
    values = dict(arg.split("=", 1) for arg in args if "=" in arg)
    assert targets, "no target"
    for target in targets:
        assert target in rules, f"make {target}: no such rule in the Makefile (rules: {', '.join(sorted(rules))})"
    for variable in values:
        assert f"$({variable})" in makefile, f"make {variable}=...: the Makefile has no variable {variable}"
    if "study" in targets:
        default = re.search(r"^STUDY\s*\?=\s*(\S+)", makefile, flags=re.MULTILINE).group(1)
        read_study(values.get("STUDY", default), [f"name={values['STUDY_NAME']}"] if "STUDY_NAME" in values else [])


def script(path: Path):
    spec = importlib.util.spec_from_file_location(f"documented_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(monkeypatch, argv: list[str]) -> None:
    program, *args = argv
    program = program.removeprefix(".venv/bin/")
    if [program, *args[:2]] == ["ray", "job", "submit"]:
        assert "--" in args, "ray job submit without `--` and a command"
        return run(monkeypatch, args[args.index("--") + 1:])
    if program == "acpo":
        return acpo(monkeypatch, args)
    if program == "make":
        return make(args)
    if program in ("python", "python3") and args[:2] == ["-m", "sweeps.cli"]:
        return acpo(monkeypatch, args[2:])
    if program in ("python", "python3") and args[:2] == ["-m", "tests.faults"]:
        return check_schema(parse_only(monkeypatch, importlib.import_module("tests.faults.__main__").main, args[2:]))
    if program in ("python", "python3") and args[:1] == ["sweeps/acpo_sweep.py"]:
        return sweep(monkeypatch, args[1:])
    if program in ("python", "python3") and args[:1] == ["sweeps/acpo_study.py"]:
        return study(args[1:])
    if program in ("python", "python3") and args and re.fullmatch(r"bench/\w+\.py", args[0]):
        return check_schema(parse_only(monkeypatch, script(PROJECT_ROOT / args[0]).main, args[1:]))
    if program == "bench/gpu_check.sh":  # the script installs from --wheels, then runs bench/gpu_check.py with the rest
        rest = [arg for i, arg in enumerate(args) if arg != "--wheels" and (i == 0 or args[i - 1] != "--wheels")]
        return check_schema(parse_only(monkeypatch, script(PROJECT_ROOT / "bench" / "gpu_check.py").main, rest))
    pytest.fail(f"not a command this test knows how to run: {' '.join(argv)} (teach run() or add it to SKIP with the reason)")


@pytest.mark.parametrize("where, text, argv, reason", runs())
def test_documented_command_runs(where, text, argv, reason, tmp_path, monkeypatch):
    if reason:
        pytest.skip(reason)
    for variable in ("RAY_ADDRESS", "ACPO_OPTUNA_STORAGE"):  # the reader's own cluster and database are not this test's
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)  # relative storage folders (runs/...) land here; presets resolve under the project
    shutil.copy(PROJECT_ROOT / "sweeps" / "studies" / "digits.yaml", tmp_path / "my-study.yaml")  # `acpo study --study my-study.yaml`
    try:
        run(monkeypatch, argv)
    except SystemExit as exit:  # argparse: a flag the program does not know (its message is in the captured stderr)
        pytest.fail(f"{where}: `{text}` exits {exit.code}: its arguments do not parse")


def test_every_code_block_names_its_language():
    unnamed = [f"{page.relative_to(PROJECT_ROOT)}:{line}: {language!r}" for page in PAGES
               for language, line, _ in fenced_blocks(page.read_text()) if language not in LANGUAGES]
    assert not unnamed, f"fenced blocks need one of {sorted(LANGUAGES)} (sh blocks are run): {unnamed}"


def test_the_documented_commands_are_found_and_the_skip_table_is_used():
    commands = documented_commands()
    assert len([c for c in commands if not skip_reason(c)]) >= 30
    unused = [key for key in SKIP if not any(skip_reason(c) == SKIP[key] for c in commands)]
    assert not unused, f"SKIP entries that match no documented command: {unused}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_resolve():
    broken = []
    for page in PAGES:
        text = without_fences(page.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if PROJECT_ROOT.resolve() not in resolved.parents and resolved != PROJECT_ROOT.resolve():
                continue  # outside the checkout (../shared/DESIGN.md)
            if not resolved.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and anchor not in {slug(h) for h in re.findall(r"^#+ (.+)$", without_fences(resolved.read_text()), flags=re.MULTILINE)}:
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
