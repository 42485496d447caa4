"""The reference pages made from the code, so that they cannot drift from it: docs/cli.md (every `isl` command and
option, from the argument parser), docs/settings.md (every ISL_* setting, from the settings classes) and
docs/modules.md (every module of every package, with the first sentence of its docstring).

`python -m worker.reference` writes them; tests/worker/test_reference.py fails when a committed page is stale."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
HEADER = "<!-- made by `python -m worker.reference` from {source}; edit that, not this page -->\n\n"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "(required)"
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction) or action.default in (None, [],
                                                                                                        argparse.SUPPRESS):
        return ""
    return f"`{action.default}`"


def _option(action: argparse.Action) -> str:
    name = ", ".join(action.option_strings) or (action.metavar or action.dest).upper()
    if not action.option_strings:  # a positional argument
        return f"`{name}{' ...' if action.nargs in ('*', '+') else ''}`"
    if action.nargs == 0:
        return f"`{name}`"
    metavar = action.metavar or action.dest.upper()
    if action.choices and not action.metavar:
        metavar = "|".join(str(c) for c in action.choices)
    repeat = " ..." if action.nargs in ("*", "+") else ""
    return f"`{name} {metavar}{repeat}`".replace(" `", "`") if metavar else f"`{name}`"


def cli_markdown() -> str:
    """Every subcommand of `isl`: what it does, then a table of its arguments (name, default, meaning)."""
    from worker.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in commands._choices_actions}
    out = [HEADER.format(source="worker/cli.py"), "# Commands\n\n",
           "`isl [-v] COMMAND ...`: every command below; `-v` logs more. Exit status 0 on success, 2 for bad input "
           "(the message names the file or option and the problem).\n"]
    for name, sub in commands.choices.items():
        out.append(f"\n## isl {name}\n\n{_cell(helps.get(name, ''))}\n\n")
        rows = [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        if not rows:
            continue
        out.append("| argument | default | meaning |\n|---|---|---|\n")
        for action in rows:
            out.append(f"| {_option(action)} | {_default(action)} | {_cell(action.help or '')} |\n")
    return "".join(out)


def settings_markdown() -> str:
    """Every ISL_* setting: its variable, default and meaning; those only the workers read are marked."""
    from service.settings import Settings
    from worker.tasks.settings import WorkerSettings

    shared = set(Settings.model_fields)
    out = [HEADER.format(source="service/settings.py and worker/tasks/settings.py"), "# Settings\n\n",
           "Environment variables, read at start by the API (`isl serve`), the workers (`isl worker`) and the DICOM "
           "listener. Those marked *(workers)* are read by the workers only (`worker/tasks/settings.py`); the rest "
           "by every process (`service/settings.py`).\n\n| variable | default | meaning |\n|---|---|---|\n"]
    for name, field in WorkerSettings.model_fields.items():
        default = field.default
        shown = "(none)" if default in ("", None) else f"`{default}`"
        who = "" if name in shared else " *(workers)*"
        out.append(f"| `ISL_{name.upper()}` | {shown} | {_cell(field.description or '')}{who} |\n")
    return "".join(out)


PACKAGES = ("imaging", "segmentation", "registration", "isl", "jobstore", "service", "worker")


def _summary(path: Path) -> str:
    """The first sentence of a module's docstring."""
    import ast

    doc = " ".join((ast.get_docstring(ast.parse(path.read_text())) or "").split())
    return _cell(doc[: doc.index(". ") + 1] if ". " in doc else doc)


def modules_markdown() -> str:
    """Every module of the packages, in dependency order (docs/architecture.md says which may import which)."""
    root = DOCS.parent
    out = [HEADER.format(source="each module's docstring"), "# Modules\n\n",
           "Every module, in the order of the layers of [architecture.md](architecture.md), with the first sentence "
           "of its docstring.\n"]
    for package in PACKAGES:
        out.append(f"\n## {package}/\n\n| module | what it holds |\n|---|---|\n")
        for path in sorted((root / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            out.append(f"| `{path.relative_to(root).as_posix()}` | {_summary(path)} |\n")
    return "".join(out)


PAGES = {"cli.md": cli_markdown, "settings.md": settings_markdown, "modules.md": modules_markdown}


def main(argv: list[str] | None = None) -> int:
    """Write the pages (default), or with --check say which are stale and exit 1."""
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    stale = []
    for name, make in PAGES.items():
        text, path = make(), DOCS / name
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    for name in stale:
        print(f"docs/{name} is stale: run python -m worker.reference", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
