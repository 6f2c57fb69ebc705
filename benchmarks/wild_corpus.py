"""Runs the offline doctor over a labelled corpus of real runs and scores it.

Each run folder holds a ``trainer_state.json`` (and its ``adapter_config.json`` when it had one);
``runs.tsv`` gives per run the findings a good diagnosis reports (``must``) and the false alarms
(``must_not``). Prints, per run, the must findings missed and the must_not findings raised, then the
totals.

    python benchmarks/wild_corpus.py [--corpus ../shared/corpus/wild-dev] [--verbose]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from lora_doctor.offline import diagnose

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "wild-dev"  # ../shared


def _slugs(cell: str) -> set[str]:
    return {s.strip() for s in (cell or "").split(",") if s.strip()}


def score(corpus: Path, verbose: bool = False) -> tuple[int, int, int, int]:
    """Diagnoses every run of ``corpus``; returns (must, missed, must_not, raised)."""
    with open(corpus / "runs.tsv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    must_n = missed_n = not_n = raised_n = 0
    print(f"{'run':5} {'kind':6} {'found':42} {'missed':28} false")
    for row in rows:
        run = corpus / row["id"]
        must, must_not = _slugs(row.get("must", "")), _slugs(row.get("must_not", ""))
        try:
            found = diagnose(run).slugs
        except ValueError as err:
            print(f"{row['id']:5} unreadable: {err}")
            found = set()
        missed, raised = must - found, must_not & found
        must_n, missed_n = must_n + len(must), missed_n + len(missed)
        not_n, raised_n = not_n + len(must_not), raised_n + len(raised)
        shown = ",".join(sorted(found)) if verbose else ",".join(sorted(found & (must | must_not)))
        print(
            f"{row['id']:5} {row.get('kind', ''):6} {shown:42} "
            f"{','.join(sorted(missed)) or '-':28} {','.join(sorted(raised)) or '-'}"
        )
    return must_n, missed_n, not_n, raised_n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT)
    parser.add_argument(
        "--verbose", action="store_true", help="show every finding, not only labelled ones"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    must, missed, must_not, raised = score(args.corpus, args.verbose)
    print(
        f"\nmust findings found: {must - missed}/{must}   must_not raised: {raised}/{must_not}   "
        f"({time.perf_counter() - start:.2f} s)"
    )
    return 0 if missed == 0 and raised == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
