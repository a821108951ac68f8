"""One table from a core, a fan-out and a scale-out result: the README's Performance table.

``bench_core.py``, ``bench_fanout.py``, ``bench_scaleout.py`` and
``bench_instructions.py`` print tables with the same columns (raw ASGI, Starlette
floor, sse-starlette, sseviews, sseviews' ratio to the case's baseline, target,
met); this script joins the rows of their JSON result files (a scale-out one only
with ``--scaleout``, an instruction-count one only with ``--instructions``) into
one markdown table: the targeted rows and the baselines they are measured
against, all rows with ``--all``. The instruction-count row has no target; it is
shown whenever ``--instructions`` asks for it.
Under the table it lists the Starlette floor's ratio to raw ASGI for those rows
(``floor/raw`` in a core result, ``floor_over_raw`` in a fan-out one): what
Starlette's app, router and middleware ``send`` wrappers cost before any SSE
code runs. A fan-out result written before the fan-out floor existed has ``-``
in its floor column and no such ratios.

    python benchmarks/report.py                    # newest core-*.json and fanout-*.json
    python benchmarks/report.py --scaleout         # ... and the newest scaleout-*.json
    python benchmarks/report.py --instructions     # ... and the newest instructions-*.json
    python benchmarks/report.py results/core-A.json results/fanout-B.json --all
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.dont_write_bytecode = True  # keep __pycache__ out of the work tree

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from benchmarks.harness import RESULTS_DIR  # noqa: E402

# Where each benchmark keeps its rows in the result document.
ROW_SECTIONS = {"core": "cases", "fanout": "rows", "scaleout": "rows", "instructions": "rows"}
NEWEST = Path("newest")  # --scaleout or --instructions without a path


def newest(benchmark: str) -> Path:
    found = sorted(RESULTS_DIR.glob(f"{benchmark}-*.json"))
    if not found:
        raise SystemExit(f"no {benchmark}-*.json in {RESULTS_DIR}; run bench_{benchmark}.py first")
    return found[-1]


def load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    benchmark = document.get("benchmark")
    if benchmark not in ROW_SECTIONS:
        raise SystemExit(
            f"{path}: not a bench_core, bench_fanout, bench_scaleout or bench_instructions result"
        )
    rows = document.get(ROW_SECTIONS[benchmark], {})
    if not all("cells" in row for row in rows.values()):
        raise SystemExit(f"{path}: written by an older benchmark script (no table cells)")
    return document


def floor_over_raw(row: dict[str, Any]) -> float | None:
    """The floor's median over raw's for one row of either benchmark, if both ran."""
    if "ratios" in row:  # bench_core
        value = row["ratios"].get("floor/raw")
    else:  # bench_fanout
        value = row.get("floor_over_raw")
    return float(value) if value is not None else None


def source_note(path: Path, document: dict[str, Any]) -> str:
    environment = document.get("environment", {})
    return (
        f"{path.name}: {document['benchmark']}, {document['sizes']['runs']} run(s), "
        f"started {document['started']}, {document['duration_seconds']} s, "
        f"Python {environment.get('python')}, {environment.get('cpu_count')} CPUs, "
        f"argv {document.get('argv')}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("core", nargs="?", type=Path, help="a core-*.json (default: newest)")
    parser.add_argument("fanout", nargs="?", type=Path, help="a fanout-*.json (default: newest)")
    parser.add_argument(
        "--scaleout",
        nargs="?",
        type=Path,
        const=NEWEST,
        help="also the rows of a scaleout-*.json (without a path: the newest)",
    )
    parser.add_argument(
        "--instructions",
        nargs="?",
        type=Path,
        const=NEWEST,
        help="also the row of an instructions-*.json (without a path: the newest)",
    )
    parser.add_argument("--all", action="store_true", help="also the (info) rows")
    args = parser.parse_args(argv)
    paths = [args.core or newest("core"), args.fanout or newest("fanout")]
    if args.scaleout is not None:
        paths.append(newest("scaleout") if args.scaleout == NEWEST else args.scaleout)
    if args.instructions is not None:
        paths.append(newest("instructions") if args.instructions == NEWEST else args.instructions)
    documents = [load(path) for path in paths]
    tables = [document["table_markdown"].splitlines() for document in documents]
    if any(table[:2] != tables[0][:2] for table in tables[1:]):
        raise SystemExit("the tables have different columns")
    lines = tables[0][:2]
    floor_lines = []
    for document in documents:
        asked_for = document["benchmark"] == "instructions"  # its one row is (info)
        for row in document[ROW_SECTIONS[document["benchmark"]]].values():
            if args.all or not row["info"] or asked_for:
                lines.append("| " + " | ".join(row["cells"]) + " |")
                ratio = floor_over_raw(row)
                if ratio is not None:
                    floor_lines.append(f"- {row['cells'][0]}: {ratio:.2f}x raw")
    print("\n".join(lines))
    print()
    if floor_lines:
        print("Starlette floor over raw ASGI (Starlette's own cost, no SSE code):\n")
        print("\n".join(floor_lines))
        print()
    for path, document in zip(paths, documents, strict=True):
        print(f"<!-- {source_note(path, document)} -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
