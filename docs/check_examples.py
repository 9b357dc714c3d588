"""Run the examples of the README and the guides and say which still print what the page shows.

Usage: python docs/check_examples.py [--long] [--update] [FILE.md ...]

Without FILE, every page: README.md and docs/*.md. Quick blocks always run (the test suite runs them
too, tests/test_docs_examples.py); --long adds the blocks marked ``<!-- example: long -->``
(Fashion-MNIST, a sweep, several processes: minutes). For each block it prints whether it matched,
and for one that did not, why and a unified diff of the normalised lines (docs/examples.py says what
is compared). --update writes what each block printed into its page (blocks without ``...``
only; the others are for a person to edit): to regenerate the shown outputs from real runs after a
change, then read `git diff` before committing.
Exit status: 0 every block that ran matched, 1 some drifted.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docs.examples import markdown_files, rewrite, run_page  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="Markdown pages (default: README.md and docs/*.md)")
    parser.add_argument("--long", action="store_true", help="also run the blocks marked long")
    parser.add_argument("--update", action="store_true", help="write what each block printed into its page (blocks without ...)")
    parser.add_argument("--show-output", action="store_true", help="print what each block printed")
    args = parser.parse_args(argv)
    pages = [p.resolve() for p in args.files] or markdown_files()

    def report(result) -> None:
        label = {"ok": "ok     ", "drift": "DRIFT  ", "skipped": "skipped"}[result.status]
        first = result.block.commands()[0] if result.block.kind == "console" else "python example"
        timing = f" ({result.seconds:.1f} s)" if result.status != "skipped" else ""
        print(f"{label} {result.block.where}{timing}  {first[:90]}", flush=True)
        if args.show_output and result.status != "skipped":
            print("\n".join("          | " + line for line in result.transcript.splitlines()), flush=True)
        if result.status == "skipped":
            print(f"          {result.why}", flush=True)
        elif result.status == "drift":
            print(f"          {result.why}", flush=True)
            if result.diff:
                print("\n".join("          " + line for line in result.diff.splitlines()), flush=True)

    started = time.monotonic()
    results = []
    for page in pages:
        results += run_page(page, long=args.long, on_result=report)
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "drift", "skipped")}
    print(f"{counts['ok']} matched, {counts['drift']} drifted, {counts['skipped']} skipped "
          f"in {time.monotonic() - started:.0f} s")
    if args.update:
        print(f"updated {rewrite(results)} block(s); blocks with '...' are left to edit by hand")
    return 1 if counts["drift"] else 0


if __name__ == "__main__":
    sys.exit(main())
