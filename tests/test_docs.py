"""The README stays a first page (the reference lives in docs/), and every page and section it links to exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {anchor(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def test_the_readme_is_one_first_page_of_at_most_250_lines():
    assert len((REPO / "README.md").read_text().splitlines()) <= README_MAX_LINES


def test_every_page_and_section_the_readme_links_to_exists():
    links = [link for link in LINK.findall((REPO / "README.md").read_text()) if "://" not in link]
    assert any(link.startswith("docs/") and link.endswith(".md") for link in links)
    for link in links:
        path, _, section = link.partition("#")
        page = REPO / path
        assert page.is_file(), f"README links to {path}, which does not exist"
        if section:
            assert section in anchors(page), f"README links to {link}: {path} has no such section"
