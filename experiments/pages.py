"""The study pages under docs/: their prose is written by hand, their tables and figures are
generated from the results committed under docs/results/.

A page marks each generated part with a pair of HTML comments,

    <!-- begin NAME -->
    ...
    <!-- end NAME -->

and its study module's ``blocks(results, figures)`` returns NAME -> Markdown for every such
part, writing the figures into ``figures`` as it goes. Everything outside the blocks is prose.
Each page has a section "What we conclude", written by hand, and each number in it must
stand in one of the page's blocks (``stray_numbers``).

    python experiments/pages.py [PAGE ...]           # rewrite the blocks and the figures
    python experiments/pages.py --check [PAGE ...]   # exit 1 where a page would change
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# page -> (the module that makes its blocks, keyword arguments of its ``blocks``)
PAGES = {
    "reproduction": ("reproduce", {}),
    "beyond": ("beyond", {}),
    "cifar": ("cifar", {}),
    "certified": ("certified_tables", {"study": "cpu"}),
    "certified-passes": ("certified_tables", {"study": "passes"}),
    "certified-gpu": ("certified_tables", {"study": "gpu"}),
}
CONCLUSIONS = "What we conclude"
BLOCK = re.compile(r"<!-- begin (\S+) -->\n(.*?)<!-- end \1 -->\n", re.S)
# A number cited in prose: not part of a word or setting (CIFAR-10, N=21, 1e-4), with any
# thousands commas; a trailing "x" or "%" is its unit.
NUMBER = re.compile(r"(?<![\w.,=])(?<!\w-)(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![a-wyzA-Z_\d])")
# Not numbers of results: references to the paper's figures, tables and equations.
REFERENCE = re.compile(
    r"\b(?:Fig\.|Figs\.|Figure|Table|Tables|Eq\.)\s+\d+[a-z]?(?:\s*(?:and|,)\s*\d+[a-z]?)*"
)


class PageError(Exception):
    """A page whose blocks and generator disagree."""


def fill(text: str, blocks: dict[str, str]) -> str:
    """``text`` with each block's content replaced by ``blocks[name]``; a block without a
    generator, or a generated block the page does not place, is an error."""
    placed = BLOCK.findall(text)
    names = [name for name, _ in placed]
    if sorted(names) != sorted(blocks) or len(set(names)) != len(names):
        raise PageError(f"blocks in the page {sorted(names)}, generated {sorted(blocks)}")
    return BLOCK.sub(
        lambda m: f"<!-- begin {m[1]} -->\n{blocks[m[1]].strip()}\n<!-- end {m[1]} -->\n", text
    )


def conclusions(text: str) -> str:
    """The page's sections headed "What we conclude" (at any level, to the next heading),
    without their code, links' targets and references to the paper's figures and tables; an
    error where there are none."""
    found = re.findall(rf"^#+ {CONCLUSIONS}[^\n]*\n(.*?)(?=^#|\Z)", text, flags=re.M | re.S)
    if not found:
        raise PageError(f"no section {CONCLUSIONS!r}")
    text = BLOCK.sub("", "\n".join(found))
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return REFERENCE.sub("", text)


def stray_numbers(text: str) -> list[str]:
    """The numbers in the page's conclusions that none of its blocks holds."""
    blocks = "\n".join(body for _, body in BLOCK.findall(text))
    held = {n.replace(",", "") for n in re.findall(r"\d[\d,]*(?:\.\d+)?", blocks)}
    cited = {n.replace(",", "") for n in NUMBER.findall(conclusions(text))}
    return sorted(cited - held)


def render(page: str, figures: Path, results: Path | None = None) -> str:
    """The page with its blocks made afresh from ``results`` (default docs/results/PAGE/), its
    figures drawn into ``figures``."""
    module, options = PAGES[page]
    make = importlib.import_module(module).blocks
    figures.mkdir(parents=True, exist_ok=True)
    return fill(
        (DOCS / f"{page}.md").read_text(),
        make(results or DOCS / "results" / page, figures, **options),
    )


def write(page: str, results: Path | None = None) -> None:
    """Rewrite docs/PAGE.md's blocks and its figures in docs/PAGE/ from ``results`` (default
    docs/results/PAGE/)."""
    doc = DOCS / f"{page}.md"
    doc.write_text(render(page, DOCS / page, results))
    print(f"wrote {doc.relative_to(ROOT)} and docs/{page}/*.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("pages", nargs="*", help=f"default: every page ({', '.join(PAGES)})")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 on a difference")
    args = p.parse_args(argv)
    if set(args.pages) - set(PAGES):
        p.error(f"no such page: {', '.join(sorted(set(args.pages) - set(PAGES)))}")
    changed = []
    for page in args.pages or PAGES:
        if not args.check:
            write(page)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            text = render(page, Path(tmp))
        if text != (DOCS / f"{page}.md").read_text():
            changed.append(page)
        stray = stray_numbers(text)
        if stray:
            changed.append(f"{page} (numbers in its conclusions that no table holds: {stray})")
    for page in changed:
        print(f"differs: {page}", file=sys.stderr)
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
