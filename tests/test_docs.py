"""The documentation against what it documents: the option tables against the parsers, and
every relative link (and its #anchor) against the files and headings it points to."""

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("option_tables", REPO / "tools" / "option_tables.py")
option_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(option_tables)

PAGES = sorted([REPO / "README.md", REPO / "jobs" / "README.md", *(REPO / "docs").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def test_the_option_tables_are_the_parsers():
    assert option_tables.OPTIONS_MD.read_text() == option_tables.render(), option_tables.STALE


def _prose(text: str) -> str:
    """Markdown without its code blocks: a `[x](y)` inside code is not a link."""
    return FENCE.sub("", text)


def anchors(page: Path) -> Iterator[str]:
    """The #fragments GitHub gives the page's headings: lower case, punctuation but - and _
    dropped, spaces as hyphens, a repeated one suffixed -1, -2, ..."""
    seen: dict[str, int] = {}
    for line in _prose(page.read_text()).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            slug = re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(CODE_SPAN.sub("", _prose(page.read_text())))
            if not re.match(r"[a-z]+:", t)]  # http:, https:, mailto: are not checked here


def test_the_pages_are_found():
    assert {"README.md", "architecture.md", "options.md", "model-format.md"} <= {p.name for p in PAGES}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_a_file_and_heading_that_exist(page):
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(REPO) if file.is_relative_to(REPO) else file}")
        elif fragment and file.suffix == ".md" and fragment not in set(anchors(file)):
            broken.append(f"{target}: no heading #{fragment} in {file.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)} has broken links:\n  " + "\n  ".join(broken)
