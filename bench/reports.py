"""Re-derive the committed reports (bench/results/reports/) from the committed run records, with the current
src.evaluate, and check or rewrite them.

    uv run python bench/reports.py --check     # exit 1 and name the reports the current code would write otherwise
    uv run python bench/reports.py             # rewrite them (report.md and aggregated_metrics.json)

Each report reads the runs of the run configs its committed aggregated_metrics.json lists, every seed of them in its
records folder (REPORTS), and that folder's timing records, at the settings it records: what
`uv run python -m src.evaluate results_dir=<a copy of the folder> run_ids='[...]'` writes to comparison/, without
the per-run figures and without writing into the committed folders.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from src import evaluate as E  # noqa: E402

RESULTS = REPO / "bench" / "results"
REPORT_DIR = RESULTS / "reports"
# report name -> the folder of committed run records it reads
REPORTS = {"sst2-demo": "study-MiniLM-L6-22M", "sst2-ablation": "study-MiniLM-L6-22M",
           "sst2-tuning": "study-MiniLM-L6-22M", "study-MiniLM-L6-22M": "study-MiniLM-L6-22M",
           "study-MiniLM-L6-22M-long": "study-MiniLM-L6-22M-long"}


def paths(name: str) -> tuple[Path, Path]:
    return REPORT_DIR / f"{name}-report.md", REPORT_DIR / f"{name}-aggregated_metrics.json"


def rederive(name: str) -> tuple[str, str]:
    """(report.md, aggregated_metrics.json) as the current src.evaluate writes them for the report's runs, at the
    settings the report records (config/hypotheses.yaml's, with any overrides it was made with)."""
    committed = json.loads(paths(name)[1].read_text())
    run_ids = list(dict.fromkeys(r["run_id"] for r in committed["runs"]))
    folder = RESULTS / REPORTS[name]
    records = E.load_runs(folder, run_ids, False, E.WandbSource())
    settings = E.load_settings({k: committed["settings"][k] for k in ("statistics", "hypotheses")})
    texts = E.comparison_texts(E.aggregate(records, settings, E.load_timing_records(folder)))
    return texts["report.md"], texts["aggregated_metrics.json"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare only; exit 1 when a report would change")
    p.add_argument("names", nargs="*", default=[n for n in REPORTS if paths(n)[1].exists()],
                   help=f"reports (default: every committed one of {list(REPORTS)})")
    args = p.parse_args(argv)
    stale = []
    for name in args.names:
        if name not in REPORTS:
            p.error(f"unknown report {name!r}; known: {list(REPORTS)}")
        if not all(path.exists() for path in paths(name)):
            p.error(f"{name}: no committed report in {REPORT_DIR} to re-derive (its runs come from its committed "
                    f"aggregated_metrics.json); write it first with src.evaluate or bench/study.py")
        texts = rederive(name)
        changed = [path.name for path, text in zip(paths(name), texts) if path.read_text() != text]
        if changed and not args.check:
            for path, text in zip(paths(name), texts):
                E.atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text))
        stale += [name] if changed else []
        print(f"{name}: {'differs: ' + ', '.join(changed) if changed else 're-derives as committed'}"
              f"{' (rewritten)' if changed and not args.check else ''}", flush=True)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
