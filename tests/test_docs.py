"""README.md and docs/: every documentation page is linked from the README, and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if not t.startswith(("http://", "https://", "#", "mailto:"))]


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.split("#")[0]).resolve() for t in _links(REPO / "README.md")}
    pages = set((REPO / "docs").resolve().glob("*.md"))
    assert pages and not pages - linked, sorted(p.name for p in pages - linked)


def test_relative_links_resolve():
    broken = [f"{page.relative_to(REPO)}: {t}" for page in [REPO / "README.md", *(REPO / "docs").glob("*.md")]
              for t in _links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert broken == []
