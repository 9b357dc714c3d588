"""The README and the guides in docs/ stay true: their examples print what the pages show, their links lead
somewhere, and each guide says what it is for and where to go next.

The quick examples of each page run here, in order, in one temporary directory per page (docs/examples.py;
`python docs/check_examples.py --long` also runs the long ones: Fashion-MNIST, a sweep, two processes).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from docs.examples import ROOT, markdown_files, parse, run_page

README = ROOT / "README.md"
README_LIMIT = 15 * 1024  # bytes: the README is a front page, the guides hold the rest
GUIDES = sorted((ROOT / "docs").glob("*.md"))
PAGES = markdown_files()
#: A page whose quick examples train (kiln train, resume, lr-find, a Python run) is an end-to-end test.
TRAINS = re.compile(r"\bkiln (?:train|resume|lr-find|sweep)\b")


def _quick_blocks(page: Path):
    return [b for b in parse(page) if b.kind != "file" and b.skip is None and not b.long]


def _trains(page: Path) -> bool:
    return any(b.kind == "python" or any(TRAINS.search(c) for c in b.commands()) for b in _quick_blocks(page))


class _PageExamples:
    """The quick examples of one page, run in order in one working directory."""

    page: Path

    def test_its_quick_examples_print_what_the_page_shows(self):
        results = run_page(self.page)
        drifted = [r for r in results if r.status == "drift"]
        message = "\n\n".join(f"{r.block.where}: {r.why}\n{r.diff}" for r in drifted)
        name = self.page.relative_to(ROOT)
        assert not drifted, f"the output shown in {name} drifted from what kiln prints now " \
                            f"(python docs/check_examples.py {name} shows the same):\n{message}"


# One class per page: pytest-xdist's --dist loadscope sends each class to a worker of its own, so the pages
# run side by side instead of one after another on one worker.
for _page in PAGES:
    if _quick_blocks(_page):
        _name = "TestExamplesOf" + "".join(w.capitalize() for w in re.split(r"[^A-Za-z0-9]+", _page.stem) if w)
        _name += "Guide" if _page.parent.name == "docs" else ""
        _cls = type(_name, (_PageExamples,), {"page": _page, "__doc__": f"The quick examples of {_page.name}."})
        globals()[_name] = pytest.mark.slow(_cls) if _trains(_page) else _cls


def test_every_example_that_is_not_run_says_why():
    for page in PAGES:
        for block in parse(page):
            if block.skip is not None:
                assert block.skip, f"{block.where}: `<!-- example: skip (...) -->` needs a reason in the brackets"
            if block.kind == "python":
                assert block.output is not None, f"{block.where}: a python example needs a block showing its output"
            if block.kind == "console":
                assert block.commands(), f"{block.where}: a console block needs a `$ ` command"


def test_the_readme_is_a_front_page():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}: move the detail into a guide in docs/"


def _slug(heading: str) -> str:
    """The anchor a code host (GitHub) gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, seen = set(), {}
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        match = re.match(r"^(#{1,6}) (.*)$", line)
        if match:
            slug = _slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _prose(page: Path) -> str:
    """The page without its fenced blocks and inline code, where links live."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_leads_to_a_file_and_heading(page: Path):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page)):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def _sections(page: Path) -> tuple[list[str], str]:
    lines = page.read_text().splitlines()
    in_code, headings = False, []
    for line in lines:
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and line.startswith("## "):
            headings.append(line[3:].strip())
    return headings, page.read_text()


@pytest.mark.parametrize("guide", [g for g in GUIDES if g.name != "README.md"], ids=lambda p: p.name)
def test_every_guide_starts_with_its_purpose_and_ends_with_where_next(guide: Path):
    paragraphs = [p.strip() for p in guide.read_text().split("\n\n") if p.strip()]
    assert paragraphs[0].startswith("# ") and "\n" not in paragraphs[0], f"{guide.name} must open with one `# ` title"
    purpose = paragraphs[1]
    assert not purpose.startswith(("#", "```", "|", "-", "<!--")), \
        f"{guide.name}: the first paragraph after the title must say what the guide is for, in prose"
    assert re.search(r"\bfor\b", purpose.split(".")[0]), \
        f"{guide.name}: the first sentence should say what the guide is for ('This guide is for ...')"
    headings, text = _sections(guide)
    assert headings and headings[-1] == "Where next", f"{guide.name} must end with a `## Where next` section"
    last = text.split("## Where next", 1)[1]
    assert re.search(r"\]\([^)]+\)", last), f"{guide.name}: `## Where next` should link onward"


def test_the_guides_index_lists_every_guide():
    index = (ROOT / "docs" / "README.md").read_text()
    missing = [g.name for g in GUIDES if g.name != "README.md" and f"]({g.name})" not in index]
    assert not missing, f"docs/README.md does not link {missing}"
    readme = README.read_text()
    assert "](docs/README.md)" in readme, "README.md should link the list of guides, docs/README.md"
