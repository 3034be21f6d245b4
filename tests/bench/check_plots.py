#!/usr/bin/python3
"""Checks that bench/plot.py draws every chart from the committed results.

Runs plot.py on DOCS into a temporary directory, then checks that each file it reports is a
non-empty PNG, and that the charts it draws are exactly the ones committed in DOCS/plots and the
ones DOCS/benchmarks.md shows: a result file that no longer parses, or a chart that is drawn but
not shown (or shown but no longer drawn), fails here.
"""

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--plot", required=True, help="bench/plot.py")
    parser.add_argument("--docs", required=True, type=pathlib.Path, help="docs/")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        result = subprocess.run([sys.executable, args.plot, "--docs", str(args.docs), "--out", out],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            sys.exit(f"plot.py failed:\n{result.stderr}")
        drawn = [pathlib.Path(line) for line in result.stdout.split()]
        for path in drawn:
            data = path.read_bytes()
            if not data.startswith(b"\x89PNG\r\n\x1a\n") or len(data) < 10_000:
                sys.exit(f"{path} is not a drawn PNG ({len(data)} bytes)")
        if {p.parent for p in drawn} != {pathlib.Path(out)}:
            sys.exit(f"plot.py wrote outside --out: {drawn}")
    names = {p.name for p in drawn}
    committed = {p.name for p in (args.docs / "plots").glob("*.png")}
    shown = set(re.findall(r"\(plots/([\w.-]+\.png)\)", (args.docs / "benchmarks.md").read_text()))
    for what, other in (("committed in docs/plots", committed),
                        ("shown in docs/benchmarks.md", shown)):
        if other != names:
            sys.exit(f"plot.py draws {sorted(names)}, but {what}: {sorted(other)}")
    print(f"plot.py drew {len(names)} charts: {', '.join(sorted(names))}")


if __name__ == "__main__":
    main()
