"""The README and the pages under docs/ (issue 24, point 3).

- README.md stays short (at most 200 lines); the rest lives in docs/.
- Every relative link (and image) in README.md and docs/*.md points at an existing file and, with ``#anchor``,
  at an existing heading of that file (GitHub's slugs).
- Every docs/*.md page can be reached from README.md by following relative links.
- Every option of every console script's argparse parser is named in that command's page.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 200

#: the page that documents each console script of pyproject.toml, relative to the repository root
COMMAND_PAGES = {
    "nnUNetv2_fit_ood": "docs/fit.md",
    "nnUNetv2_predict_ood": "docs/predict.md",
    "nnUNetv2_ood_trainer_dir": "docs/install.md",
    "nnUNetv2_evaluate_ood": "docs/evaluate.md",
    "nnUNetv2_calibrate_ood": "docs/calibrate.md",
    "nnunet_ood_demo": "docs/demo.md",
}

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HTML_REF = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*\"([^\"]+)\"", re.IGNORECASE)


def prose_lines(path: Path) -> list[str]:
    """The lines of a markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup removed, lowercase, punctuation except - and _ dropped, spaces to -."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, a repeated heading numbered as GitHub does (-1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    """The link and image targets of a markdown file (inline, reference-style and HTML), code left out."""
    targets = []
    for line in prose_lines(path):
        line = INLINE_CODE.sub("", line)
        targets += LINK.findall(line) + HTML_REF.findall(line)
        m = REFERENCE.match(line)
        if m:
            targets.append(m.group(1))
    return targets


def is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("//")


def resolve(page: Path, target: str) -> tuple[Path, str | None]:
    """(file, anchor or None) a relative link of ``page`` points at."""
    file_part, _, anchor = target.partition("#")
    file = (page.parent / unquote(file_part)).resolve() if file_part else page
    return file, (unquote(anchor) if anchor else None)


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, (f"README.md has {n} lines; keep it at most {MAX_README_LINES} and move the rest "
                                   "to docs/")


def test_slug_follows_github():
    assert slug("3. Accept or review, and what it covers") == "3-accept-or-review-and-what-it-covers"
    assert slug("## `nnUNetv2_predict_ood`".lstrip("# ")) == "nnunetv2_predict_ood"
    assert slug("The decision's guarantees (issue \"Auto-accept\")") == "the-decisions-guarantees-issue-auto-accept"
    assert slug("Smaller maps: `--ood_maps_dtype`") == "smaller-maps---ood_maps_dtype"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in links(page):
        if not is_relative(target):
            continue
        file, anchor = resolve(page, target)
        if not file.exists():
            broken.append(f"{target} (no file {file})")
        elif anchor is not None:
            if file.suffix != ".md":
                broken.append(f"{target} (an anchor into a file that is not markdown)")
            elif anchor not in anchors(file):
                broken.append(f"{target} (no heading with anchor #{anchor} in {file.name})")
    assert not broken, f"{page.relative_to(ROOT)} has broken links: " + "; ".join(broken)


def test_every_docs_page_is_reachable_from_the_readme():
    reached, todo = {README.resolve()}, [README.resolve()]
    while todo:
        page = todo.pop()
        for target in links(page):
            if not is_relative(target):
                continue
            file, _ = resolve(page, target)
            if file.suffix == ".md" and file.exists() and file not in reached:
                reached.add(file)
                todo.append(file)
    unreached = sorted(str(p.relative_to(ROOT)) for p in DOCS.glob("*.md") if p.resolve() not in reached)
    assert not unreached, f"docs pages no link path from README.md reaches: {unreached}"


def console_scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml, name -> ``module:function`` (read by hand: no tomllib on 3.10)."""
    scripts, inside = {}, False
    for line in (ROOT / "pyproject.toml").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("["):
            inside = line == "[project.scripts]"
        elif inside and "=" in line:
            name, value = (part.strip().strip("\"'") for part in line.split("=", 1))
            scripts[name] = value
    assert scripts, "pyproject.toml has no [project.scripts]"
    return scripts


def test_every_console_script_has_a_page():
    assert sorted(console_scripts()) == sorted(COMMAND_PAGES), "map each console script to its docs page"


def option_strings(entry_point: str) -> list[str]:
    """Every option string of a console script's parser (``module:main`` -> ``module.build_parser()``), no -h."""
    module = importlib.import_module(entry_point.split(":")[0])
    parser = module.build_parser()
    return [s for action in parser._actions if not isinstance(action, argparse._HelpAction)
            for s in action.option_strings]


@pytest.mark.parametrize("script", sorted(COMMAND_PAGES))
def test_every_flag_is_documented_on_the_commands_page(script: str):
    page = ROOT / COMMAND_PAGES[script]
    assert page.exists(), f"{script} has no page {COMMAND_PAGES[script]}"
    text = page.read_text(encoding="utf-8")
    assert script in text
    # named in code, as the start of a code span: `-d DATASET`, `--ood METHOD ...`, `--save_ood_maps`
    missing = [opt for opt in option_strings(console_scripts()[script])
               if not re.search("`" + re.escape(opt) + r"(?=[\s`=\[,|])", text)]
    assert not missing, f"{COMMAND_PAGES[script]} does not document these flags of {script}: {missing}"
