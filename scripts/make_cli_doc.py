"""Write docs/cli.md, every command's flags, from the momentreg parser itself.

python scripts/make_cli_doc.py          # rewrites docs/cli.md
python scripts/make_cli_doc.py --check  # exits 1 if docs/cli.md is not what the parser says
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def cli_reference() -> str:
    """The Markdown page: the top-level help, then each command's, at a width of 100 columns."""
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; the page must not depend on it
    from momentreg.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = [
        "# Command-line reference",
        "",
        "Generated from the parser by `python scripts/make_cli_doc.py`; do not edit by hand. "
        "What the options do, with examples: [guide.md](guide.md).",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
    ]
    for name, sub in commands.choices.items():
        lines += ["", f"## momentreg {name}", "", "```text", sub.format_help().rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    text = cli_reference()
    if sys.argv[1:] == ["--check"]:
        if DOC.read_text() != text:
            print(f"{DOC} is out of date: python scripts/make_cli_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
