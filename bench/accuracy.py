"""Accuracy claim: LoRA, AdaLoRA and GLoRA at the same rank budget, several seeds each, through the real CLI, then
`src.evaluate` over them; prints dev accuracy mean ± std, train time, trainable parameters, rank budget and the tests.

    uv sync --group demo && uv run python bench/accuracy.py                     # offline demo: MiniLM, real SST-2
    uv run python bench/accuracy.py --tasks SST-2 RTE --data-dir path/to/glue --seeds 1 2 3
    uv run python bench/accuracy.py --model path/to/save_pretrained_folder --set model.peft.target_modules='...'

Runs start from the demo run configs (`config/run/*-MiniLM-L6-22M--GLUE-SST-2.yaml`); another task overrides
`dataset.name` and names the run `{method}-MiniLM-L6-22M--GLUE-{TASK}`. Finished runs are skipped, so an interrupted
benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from src.evaluate import TASKS  # noqa: E402  (task -> official folder name)

METHODS = {"comparative-2": "LoRA", "comparative-1": "AdaLoRA", "proposed": "GLoRA"}
TASK_NAMES = {folder: task for task, folder in TASKS.items()}
DEFAULT_SEED = OmegaConf.load(REPO / "config" / "config.yaml").default_seed  # its runs have no -seed{N} suffix
DEMO = "MiniLM-L6-22M--GLUE-SST-2"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default="results/bench_accuracy")
    p.add_argument("--tasks", nargs="+", default=["SST-2"], choices=sorted(TASK_NAMES))
    p.add_argument("--seeds", nargs="+", type=int, default=[DEFAULT_SEED, DEFAULT_SEED + 1, DEFAULT_SEED + 2])
    p.add_argument("--data-dir", default=None, help="GLUE folder in the official layout (default: data/glue)")
    p.add_argument("--model", default=None, help="save_pretrained folder (default: the demo's all-MiniLM-L6-v2)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    return p.parse_args(argv)


def run_id(method: str, task: str) -> str:
    return f"{method}-{DEMO.removesuffix('SST-2')}{task}"


def applies(override: str, method: str) -> bool:
    """`--set adalora.x=...` reaches the AdaLoRA runs only, `glo_ra.x=...` the GLoRA runs only."""
    section = override.split(".")[0]
    return {"adalora": method == "comparative-1", "glo_ra": method == "proposed"}.get(section, True)


def train(method: str, task: str, seed: int, args) -> float:
    """One run through the contract CLI; returns its wall time (0 when it had already finished)."""
    rid = run_id(method, task)
    folder = Path(args.results_dir) / (rid if seed == DEFAULT_SEED else f"{rid}-seed{seed}")
    if (folder / "summary.json").exists():
        print(f"[bench] {folder.name}: finished earlier, skipped", flush=True)
        return 0.0
    cmd = [sys.executable, "-u", "-m", "src.main", f"run={method}-{DEMO}", f"results_dir={args.results_dir}",
           "mode=full", "wandb.mode=disabled", f"seed={seed}", f"run_id={rid}",
           f"dataset.name=glue_{TASK_NAMES[task]}", *[o for o in args.set if applies(o, method)]]
    cmd += [f"dataset.data_dir={args.data_dir}"] if args.data_dir else []
    cmd += [f"model.backbone={args.model}"] if args.model else []
    print(f"[bench] {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    if subprocess.run(cmd, cwd=REPO).returncode:
        sys.exit(f"bench/accuracy.py: run {folder.name} failed (its error is above); re-run to continue")
    return time.perf_counter() - start


def fmt(stat: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    std = f" ± {stat['std'] * scale:.{digits}f}" if stat.get("std") is not None else ""
    return f"{stat['mean'] * scale:.{digits}f}{std}"


def print_table(agg: dict) -> None:
    head = f"{'task':<6} {'method':<8} {'n':>2} {'dev acc (%)':>14} {'train time (s)':>16} {'trainable':>10} " \
           f"{'rank budget':>11} {'vs LoRA (points)':>16}"
    print(head + "\n" + "-" * len(head))
    for task, by_method in agg["groups"].items():
        for method, g in by_method.items():
            gain = agg["derived"][task].get("methods", {}).get(method, {}).get("accuracy_gain_abs")
            print(f"{task:<6} {method:<8} {g['n']:>2} {fmt(g['accuracy'], 100):>14} "
                  f"{fmt(g['train_time_s'], digits=1):>16} {fmt(g['trainable_params'], digits=0):>10} "
                  f"{fmt(g['rank_budget_total'], digits=0):>11} {'' if gain is None else f'{100 * gain:+.2f}':>16}")
    for task, d in agg["derived"].items():
        share = (d.get("glora_share_of_adalora_gain") or {}).get("accuracy") or {}
        value = "-" if share.get("value") is None else f"{share['value']:.2f}"
        reason = f" ({share['reason']})" if share.get("reason") else ""
        print(f"{task}: share of AdaLoRA's accuracy gain recovered by GLoRA: {value}{reason}")
    print("\nacross seeds (glue_score paired by seed):")
    for e in agg["significance"]["seed_level"]:
        for t in e["tests"]:
            p = "-" if t["p_value"] is None else f"{t['p_value']:.4f}"
            diff = "-" if e["mean_difference"] is None else f"{100 * e['mean_difference']:+.2f}"
            pair = f"{e['method_a']} - {e['method_b']}"
            print(f"  {e['task']:<6} {pair:<17} diff {diff:>6} points  {t['test']}: "
                  f"p = {p} (n = {t['n']}){' ' + t['reason'] if t.get('reason') else ''}")
    print("per example on the dev set (McNemar exact; paired bootstrap 95% CI of the accuracy difference):")
    for e in agg["significance"]["example_level"]:
        if "mcnemar" not in e:
            print(f"  {e['task']:<6} {e['method_a'] + ' - ' + e['method_b']:<17} {e.get('reason')}")
            continue
        bs = e["bootstrap"]
        ci = "-" if bs["ci_low"] is None else f"[{100 * bs['ci_low']:+.2f}, {100 * bs['ci_high']:+.2f}]"
        print(f"  {e['task']:<6} {e['method_a'] + ' - ' + e['method_b']:<17} {e['paired_by']:<8} n = {e['n']}  "
              f"diff {100 * bs['difference']:+.2f}  CI {ci}  McNemar p = {e['mcnemar']['p_value']:.2g}")


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    walls = {}
    for task in args.tasks:
        for seed in args.seeds:  # seed-major: a partial benchmark still has every method for the first seeds
            for method in METHODS:
                walls[(task, method, seed)] = train(method, task, seed, args)
    ids = [run_id(m, t) for t in args.tasks for m in METHODS]
    if subprocess.run([sys.executable, "-m", "src.evaluate", f"results_dir={args.results_dir}",
                       f"run_ids={json.dumps(ids)}"], cwd=REPO).returncode:
        sys.exit("bench/accuracy.py: src.evaluate failed (its error is above)")
    agg = json.loads((Path(args.results_dir) / "comparison" / "aggregated_metrics.json").read_text())
    print()
    print_table(agg)
    print(f"\nbenchmark wall time: {(time.perf_counter() - start) / 60:.1f} min "
          f"({sum(1 for w in walls.values() if w)} runs trained, report in {args.results_dir}/comparison/report.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
