"""Why AdaLoRA trails LoRA on the CPU demo: accuracy against schedule length for the three methods, and AdaLoRA's (and
LoRA's) knobs one at a time at the demo's length. Every run goes through the contract CLI; finished runs are skipped,
so an interrupted study continues where it stopped.

    uv sync --group demo && uv run python bench/adalora_deficit.py                 # both parts, seed 42
    uv run python bench/adalora_deficit.py --part schedule --steps 250 500 1000 2000
    uv run python bench/adalora_deficit.py --part knobs --seeds 42 43
    uv run python bench/adalora_deficit.py --part schedule --variant tuned --steps 250 500 1000 2000 --seeds 42 43 44
    uv run python bench/adalora_deficit.py --part schedule --variant tuned --no-train   # the table from finished runs

Schedule: `--steps N` trains one epoch over the first 32·N examples of the fixed SST-2 subsample order at batch 32 (N
optimizer steps); the run configs write every schedule as a share of the run (LR warm-up 10%, AdaLoRA tinit 20% and
tfinal 32%, GLoRA warm-up 20%), so each length keeps the demo's proportions; evaluation every 20% of the run.
`--variant tuned` runs the tuned configs bench/tuning.py wrote (`{method}-tuned-MiniLM-L6-22M--GLUE-SST-2`, their
schedules are shares of the run as well) into tuned{N}/, without evaluation during training, as the tuning protocol's
seed runs. Knobs: the demo (250 steps) with one override each.
"""

from __future__ import annotations

import argparse
import json
from statistics import mean, stdev
import subprocess
import sys
from pathlib import Path

from scipy import stats

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from study import DEMO, run_folder  # noqa: E402  (a seed's folder: the default seed has no -seed{N} suffix)

METHODS = {"comparative-2": "LoRA", "comparative-1": "AdaLoRA", "proposed": "GLoRA"}
# name -> (method, run-id tag, overrides): one change at a time against the demo config
KNOBS = {
    "AdaLoRA (demo)": ("comparative-1", "demo", []),
    "AdaLoRA lr 2e-3": ("comparative-1", "lr2e-3", ["training.learning_rate=2e-3"]),
    "AdaLoRA lr 4e-3": ("comparative-1", "lr4e-3", ["training.learning_rate=4e-3"]),
    "AdaLoRA orth_reg 0": ("comparative-1", "orth0", ["adalora.orth_reg_weight=0.0"]),
    "AdaLoRA no pruning (431 of 432)": ("comparative-1", "noprune", ["adalora.total_rank_budget=431"]),
    "AdaLoRA init rank 8 (287 of 288)": ("comparative-1", "init8",
                                         ["model.peft.init_rank=8", "adalora.total_rank_budget=287"]),
    "AdaLoRA lora_alpha 32": ("comparative-1", "alpha32", ["model.peft.lora_alpha=32"]),
    "LoRA (demo)": ("comparative-2", "demo", []),
    "LoRA lr 2e-3": ("comparative-2", "lr2e-3", ["training.learning_rate=2e-3"]),
    "LoRA lr 4e-3": ("comparative-2", "lr4e-3", ["training.learning_rate=4e-3"]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default="results/adalora_deficit")  # s{steps}/ and knobs/ inside
    p.add_argument("--part", choices=["schedule", "knobs", "both"], default="both")
    p.add_argument("--variant", choices=["untuned", "tuned"], default="untuned", help="schedule part's configs")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="schedule part")
    p.add_argument("--no-train", action="store_true", help="print the tables from finished runs; a missing run stops")
    p.add_argument("--steps", nargs="+", type=int, default=[250, 500, 1000, 2000])
    p.add_argument("--seeds", nargs="+", type=int, default=[42])
    p.add_argument("--knobs", nargs="+", default=list(KNOBS), choices=list(KNOBS), metavar="NAME")
    return p.parse_args(argv)


def run(results: Path, run_id: str, method: str, seed: int, overrides: list[str], train: bool = True) -> dict:
    """One run through the CLI unless finished; its summary."""
    summary = run_folder(results, run_id, seed) / "summary.json"
    if not summary.exists():
        if not train:
            sys.exit(f"bench/adalora_deficit.py: {summary.parent} has not finished (--no-train trains nothing)")
        cmd = [sys.executable, "-u", "-m", "src.main", f"run={method}-{DEMO}", f"results_dir={results}", "mode=full",
               "wandb.mode=disabled", f"seed={seed}", f"run_id={run_id}", *overrides]
        print(f"[bench] {' '.join(cmd[3:])}", flush=True)
        if subprocess.run(cmd, cwd=REPO).returncode:
            sys.exit(f"bench/adalora_deficit.py: {run_id} (seed {seed}) failed (its error is above); re-run to go on")
    return json.loads(summary.read_text())


def schedule_run(steps: int, method: str, variant: str) -> tuple[str, str, list[str]]:
    """Folder, run config (without the demo suffix) and overrides of one schedule point: one epoch over 32 x steps
    examples."""
    overrides = [f"dataset.max_train_samples={32 * steps}"]
    if variant == "tuned":
        return f"tuned{steps}", f"{method}-tuned", [*overrides, "training.eval_every_steps=null"]
    return f"s{steps}", method, [*overrides, f"training.eval_every_steps={max(1, steps // 5)}"]


def gap(acc: dict, a: str, b: str) -> str:
    """a - b in points, paired by seed: the mean, and with several seeds each seed's and the paired t-test's p."""
    diffs = [100 * (x - y) for x, y in zip(acc[a], acc[b])]
    if len(diffs) == 1:
        return f"{diffs[0]:+.2f}"
    p = stats.ttest_rel(acc[a], acc[b]).pvalue
    return f"{mean(diffs):+.2f} ({' / '.join(f'{d:+.2f}' for d in diffs)}; t p = {p:.2f})"


def schedule(args) -> None:
    rows = {}
    for steps in args.steps:
        for method in args.methods:
            folder, config, overrides = schedule_run(steps, method, args.variant)
            for seed in args.seeds:
                s = run(Path(args.results_dir) / folder, f"{config}-{DEMO}", config, seed, overrides, not args.no_train)
                rows.setdefault((steps, method), []).append(s["accuracy"])
    print(f"\nschedule length, {args.variant} configs (one epoch of 32 x steps examples, batch 32; seeds {args.seeds}):"
          " dev accuracy (%), mean ± std over seeds; gaps paired by seed")
    print(f"{'steps':>6} {'examples':>9} " + " ".join(f"{METHODS[m]:>14}" for m in args.methods) + "  gaps")
    for steps in args.steps:
        acc = {m: rows[(steps, m)] for m in args.methods}
        cells = [f"{100 * mean(acc[m]):.2f}" + (f" ± {100 * stdev(acc[m]):.2f}" if len(acc[m]) > 1 else "")
                 for m in args.methods]
        gaps = [f"{METHODS[a]}-{METHODS[b]} {gap(acc, a, b)}" for a, b in
                (("comparative-1", "comparative-2"), ("proposed", "comparative-2"), ("proposed", "comparative-1"))
                if a in acc and b in acc]
        print(f"{steps:>6} {32 * steps:>9} " + " ".join(f"{c:>14}" for c in cells) + "  " + "; ".join(gaps))


def knobs(args) -> None:
    results = Path(args.results_dir) / "knobs"
    out = {}
    for name in args.knobs:
        method, tag, overrides = KNOBS[name]
        out[name] = [run(results, f"{method}-{tag}", method, seed, [*overrides, "training.eval_every_steps=null"],
                         not args.no_train) for seed in args.seeds]
    base = {m: mean([s["accuracy"] for s in out[f"{label} (demo)"]]) for m, label in
            (("comparative-1", "AdaLoRA"), ("comparative-2", "LoRA")) if f"{label} (demo)" in out}
    print(f"\nknobs at the demo's 250 steps (seeds {args.seeds}): dev accuracy (%), change against the same method's "
          f"demo config, and against LoRA's")
    print(f"{'setting':<34} {'accuracy':>9} {'vs own demo':>12} {'vs LoRA demo':>13} {'final rank':>11} {'trainable':>10}")
    for name, summaries in out.items():
        acc = mean([s["accuracy"] for s in summaries])
        method = KNOBS[name][0]
        own = f"{100 * (acc - base[method]):+.2f}" if method in base else "-"
        lora = f"{100 * (acc - base['comparative-2']):+.2f}" if "comparative-2" in base else "-"
        print(f"{name:<34} {100 * acc:>9.2f} {own:>12} {lora:>13} {summaries[0]['rank_budget_total']:>11} "
              f"{summaries[0]['trainable_params']:>10}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.part in ("schedule", "both"):
        schedule(args)
    if args.part in ("knobs", "both"):
        knobs(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
