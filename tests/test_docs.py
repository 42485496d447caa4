"""The user's pages hold: every relative link of README.md and docs/ reaches a file (and its #heading), and every
`isl ...` command in their code blocks is one the real argument parser accepts."""
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"```[a-z]*\n(.*?)```", flags=re.S)


def prose(page: Path):
    """(line number, line) outside code fences."""
    fence = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence:
            yield number, line


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    out, seen = set(), {}
    for _, line in prose(page):
        if m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(pages) -> list[str]:
    bad = []
    for page in pages:
        for number, line in prose(page):
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):  # not links written as code
                if re.match(r"^[a-z]+:", target):
                    continue  # http:, https:, mailto:
                path, _, anchor = target.partition("#")
                dest = (page.parent / path).resolve() if path else page
                where = f"{page.relative_to(ROOT)}:{number}: {target}"
                if not dest.exists():
                    bad.append(f"{where} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    bad.append(f"{where} (no such heading)")
    return bad


def test_every_relative_link_reaches_its_file_and_heading():
    bad = broken_links(PAGES)
    assert bad == [], "\n".join(bad)


def test_the_link_check_sees_a_missing_file_and_a_missing_heading(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# Title\n[ok](#title) [gone](b.md) [nohead](a.md#other) `[code](x.md)`\n")
    assert broken_links([tmp_path / "a.md"]) == ["a.md:2: b.md (no such file)", "a.md:2: a.md#other (no such heading)"]


def documented_commands():
    """Every `isl SUBCOMMAND ...` line in a code block of the pages (synopses with [...] left out)."""
    from worker.cli import build_parser

    names = build_parser()._subparsers._group_actions[0].choices
    for page in PAGES:
        if page.name == "cli.md":  # generated from the parser itself
            continue
        for block in FENCE.findall(page.read_text().replace("\\\n", " ")):
            for line in block.splitlines():
                m = re.search(r"(?:^|[\s;&|(])(?:\.venv/bin/)?isl ([a-z][^&|;#]*)", line)
                if not m or "[" in m.group(1):
                    continue
                try:
                    argv = [a for a in shlex.split(m.group(1)) if a != "..."]
                except ValueError:
                    continue
                if argv and argv[0] in names:
                    yield f"{page.relative_to(ROOT)}: isl {m.group(1).strip()}", argv


def test_every_documented_command_parses():
    from worker.cli import build_parser

    refused, seen = [], 0
    for where, argv in documented_commands():
        seen += 1
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                build_parser().parse_args(argv)
        except SystemExit as exc:
            if exc.code:
                refused.append(f"{where}\n    {err.getvalue().strip().splitlines()[-1]}")
    assert seen >= 10, f"only {seen} documented isl commands found: the pattern no longer matches the pages"
    assert refused == [], "\n".join(refused)


@pytest.mark.parametrize("argv", [["train", "--dataset", "d"], ["refine", "--model", "m", "--out", "o", "x.nii.gz",
                                                                "--no-such-option"]])
def test_the_command_check_sees_a_refused_command(argv):
    from worker.cli import build_parser

    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2


def test_the_readme_names_every_command():
    from worker.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    missing = [name for name in build_parser()._subparsers._group_actions[0].choices if f"`isl {name}`" not in readme]
    assert missing == [], f"README.md's Commands table lacks {missing}"
