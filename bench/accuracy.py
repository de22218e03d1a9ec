"""Accuracy claim: LoRA, AdaLoRA and GLoRA (and any named variant/control) at the same rank budget, several seeds
each, through the real CLI, then `src.evaluate` over them; prints dev accuracy mean ± std, train and step time, rank
total, adapter and trainable parameters, the tests (with intervals and Holm-adjusted p), the ablation table with each
comparison's minimum detectable effect, and the hypotheses' verdicts (config/hypotheses.yaml).

    uv sync --group demo && uv run python bench/accuracy.py                     # offline demo: MiniLM, real SST-2
    uv run python bench/accuracy.py --methods comparative-2 comparative-1 proposed proposed-params proposed-shuffled
    uv run python bench/accuracy.py --tasks SST-2 RTE --data-dir path/to/glue --seeds 1 2 3
    uv run python bench/accuracy.py --model path/to/save_pretrained_folder --set model.peft.target_modules='...'

`--methods` are run-config prefixes: each run starts from the demo run config `config/run/{method}-MiniLM-L6-22M--GLUE-
SST-2.yaml`; another task overrides `dataset.name` and names the run `{method}-MiniLM-L6-22M--GLUE-{TASK}`. Finished
runs are skipped, so an interrupted benchmark continues where it stopped. `--set adalora.*` reaches the AdaLoRA-type
runs only and `--set glo_ra.*` the GLoRA-type runs only, decided from each run config (model.peft.type and its
sections), not from the prefix.
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

METHODS = ["comparative-2", "comparative-1", "proposed"]  # LoRA, AdaLoRA, GLoRA
TASK_NAMES = {folder: task for task, folder in TASKS.items()}
CONFIG = OmegaConf.load(REPO / "config" / "config.yaml")
DEFAULT_SEED = CONFIG.default_seed  # its runs have no -seed{N} suffix
RUN_DIR = REPO / "config" / "run"
DEMO = "MiniLM-L6-22M--GLUE-SST-2"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default="results/bench_accuracy")
    p.add_argument("--methods", nargs="+", default=METHODS, metavar="PREFIX",
                   help=f"run-config prefixes of config/run/{{PREFIX}}-{DEMO}.yaml (default: {' '.join(METHODS)})")
    p.add_argument("--tasks", nargs="+", default=["SST-2"], choices=sorted(TASK_NAMES))
    p.add_argument("--seeds", nargs="+", type=int, default=[DEFAULT_SEED, DEFAULT_SEED + 1, DEFAULT_SEED + 2])
    p.add_argument("--data-dir", default=None, help="GLUE folder in the official layout (default: data/glue)")
    p.add_argument("--model", default=None, help="save_pretrained folder (default: the demo's all-MiniLM-L6-v2)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    return p.parse_args(argv)


def run_id(method: str, task: str) -> str:
    return f"{method}-{DEMO.removesuffix('SST-2')}{task}"


def _run_layers(path: Path, run_dir: Path) -> list:
    """A run config, after the run configs its own `defaults` list names (a variant written as a delta)."""
    cfg = OmegaConf.load(path)
    bases = [run_dir / f"{entry.split('/')[-1]}.yaml" for entry in cfg.get("defaults") or []
             if isinstance(entry, str) and entry != "_self_"]
    cfg.pop("defaults", None)
    return [layer for base in bases if base.exists() for layer in _run_layers(base, run_dir)] + [cfg]


def run_config(method: str, run_dir: Path = RUN_DIR):
    """The demo run config of a method prefix over config.yaml's values, unresolved (no interpolation is needed)."""
    base = OmegaConf.masked_copy(CONFIG, [k for k in CONFIG if k not in ("defaults", "hydra", "trial")])
    return OmegaConf.merge(base, *_run_layers(run_dir / f"{method}-{DEMO}.yaml", run_dir))


def adapter_kind(cfg) -> str:
    """'lora', 'adalora' or 'glora', by the rule training uses: GLoRA is a LoRA whose run config has a glo_ra
    section."""
    kind = OmegaConf.select(cfg, "model.peft.type", default="lora")
    return "glora" if kind == "lora" and "glo_ra" in cfg else kind


def applies(override: str, kind: str) -> bool:
    """`--set adalora.x=...` reaches the AdaLoRA-type runs only, `glo_ra.x=...` the GLoRA-type runs only."""
    section = override.split(".")[0]
    return {"adalora": kind == "adalora", "glo_ra": kind == "glora"}.get(section, True)


def check_methods(methods: list[str], run_dir: Path = RUN_DIR) -> dict[str, str]:
    """method prefix -> adapter kind; a prefix without a demo run config stops with the ones that exist."""
    missing = [m for m in methods if not (run_dir / f"{m}-{DEMO}.yaml").exists()]
    if missing:
        found = sorted(p.name.removesuffix(f"-{DEMO}.yaml") for p in run_dir.glob(f"*-{DEMO}.yaml"))
        sys.exit(f"bench/accuracy.py: no run config {', '.join(f'{m}-{DEMO}.yaml' for m in missing)} in {run_dir}; "
                 f"--methods can be: {' '.join(found)}")
    return {m: adapter_kind(run_config(m, run_dir)) for m in methods}


def run_folder(results_dir: str | Path, rid: str, seed: int) -> Path:
    """Where the CLI writes one seed of a run: the default seed has no -seed{N} suffix."""
    return Path(results_dir) / (rid if seed == DEFAULT_SEED else f"{rid}-seed{seed}")


def train(method: str, kind: str, task: str, seed: int, args) -> float:
    """One run through the contract CLI; returns its wall time (0 when it had already finished)."""
    rid = run_id(method, task)
    folder = run_folder(args.results_dir, rid, seed)
    if (folder / "summary.json").exists():
        print(f"[bench] {folder.name}: finished earlier, skipped", flush=True)
        return 0.0
    # the task's own run config when it ships one, else the SST-2 demo config on that task
    own = (RUN_DIR / f"{rid}.yaml").exists()
    cmd = [sys.executable, "-u", "-m", "src.main", f"run={rid if own else f'{method}-{DEMO}'}",
           f"results_dir={args.results_dir}", "mode=full", "wandb.mode=disabled", f"seed={seed}",
           *([] if own else [f"run_id={rid}", f"dataset.name=glue_{TASK_NAMES[task]}"]),
           *[o for o in args.set if applies(o, kind)]]
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


def fmt_ratio(ratio: dict | None) -> str:
    """A time ratio object: `1.23` or `1.23 n/c` (not comparable: the reason is in report.md)."""
    if not ratio or ratio.get("value") is None:
        return "-"
    return f"{ratio['value']:.2f}" + ("" if ratio["comparable"] else " n/c")


def print_table(agg: dict) -> None:
    width = max(8, *(len(m) for g in agg["groups"].values() for m in g))
    head = f"{'task':<6} {'method':<{width}} {'n':>2} {'dev acc (%)':>14} {'train time (s)':>16} " \
           f"{'step ratio':>10} {'trainable':>10} {'rank total':>10} {'adapter':>9} {'vs LoRA (points)':>16}"
    print(head + "\n" + "-" * len(head))
    for task, by_method in agg["groups"].items():
        for method, g in by_method.items():
            d = agg["derived"][task].get("methods", {}).get(method, {})
            gain = d.get("accuracy_gain_abs")
            print(f"{task:<6} {method:<{width}} {g['n']:>2} {fmt(g['accuracy'], 100):>14} "
                  f"{fmt(g['train_time_s'], digits=1):>16} {fmt_ratio(d.get('step_time_ratio')):>10} "
                  f"{fmt(g['trainable_params'], digits=0):>10} {fmt(g['rank_budget_total'], digits=0):>10} "
                  f"{fmt(g['adapter_params_reported'], digits=0):>9} "
                  f"{'' if gain is None else f'{100 * gain:+.2f}':>16}")
    print("(adapter: parameters at the final ranks where recorded; step ratio: median step time vs LoRA, "
          "n/c = not comparable, see report.md; a tuned group's points are over tuned LoRA)")
    for task, d in agg["derived"].items():
        for label, block in (("", d), (" (tuned groups)", d.get("tuned"))):
            if block is None:
                continue
            share = (block.get("glora_share_of_adalora_gain") or {}).get("accuracy") or {}
            value = "-" if share.get("value") is None else f"{share['value']:.2f}"
            reason = f" ({share['reason']})" if share.get("reason") else ""
            print(f"{task}{label}: share of AdaLoRA's accuracy gain recovered by GLoRA: {value}{reason}")
    print("\nacross seeds (glue_score paired by seed):")
    for e in agg["significance"]["seed_level"]:
        print_seed_level(e, f"{e['method_a']} - {e['method_b']}")
    print("per example on the dev set (McNemar exact, Holm over a pair's seeds; paired bootstrap 95% CI of the "
          "accuracy difference):")
    for e in agg["significance"]["example_level"]:
        if "mcnemar" not in e:
            print(f"  {e['task']:<6} {e['method_a'] + ' - ' + e['method_b']:<17} {e.get('reason')}")
            continue
        bs = e["bootstrap"]
        ci = "-" if bs["ci_low"] is None else f"[{100 * bs['ci_low']:+.2f}, {100 * bs['ci_high']:+.2f}]"
        print(f"  {e['task']:<6} {e['method_a'] + ' - ' + e['method_b']:<17} {e['paired_by']:<8} n = {e['n']}  "
              f"diff {100 * bs['difference']:+.2f}  CI {ci}  McNemar p = {e['mcnemar']['p_value']:.2g} "
              f"(Holm {e['mcnemar']['p_adjusted']:.2g})")


def print_seed_level(e: dict, pair: str) -> None:
    """One seed-level comparison: mean difference and its interval, both tests' p (raw; Holm within the family),
    the MDE, the seeds the hypothesis' margin needs and the reading."""
    diff = "-" if e["mean_difference"] is None else f"{100 * e['mean_difference']:+.2f}"
    ci = "-" if not e.get("ci") else f"[{100 * e['ci'][0]:+.2f}, {100 * e['ci'][1]:+.2f}]"
    p = ["-" if t.get("p_value") is None else f"{t['p_value']:.4f} (Holm {t['p_adjusted']:.4f})" for t in e["tests"]]
    p += ["-"]
    mde = "-" if e["mde"]["mde"] is None else f"{100 * e['mde']['mde']:.2f} points"
    needed = e["mde"]["seeds_needed_for_margin"]
    print(f"  {e['task']:<6} {pair:<34} diff {diff:>6} points {ci}  t-test p = {p[0]}  Wilcoxon p = {p[1]}  "
          f"(n = {e['n']})  MDE {mde}  seeds for the margin {needed or '-'}: {e['reading']}")


def print_ablation(agg: dict) -> None:
    """Every variant/control against LoRA and GLoRA, with what it spent."""
    if not agg.get("ablation"):
        return
    print("\nablation and controls (glue_score paired by seed; Holm over each task's table; MDE at power 0.8; "
          "budget vs LoRA):")
    for entry in agg["ablation"]:
        b = entry["budget"]
        ratio = "-" if b["adapter_params_ratio"] is None else f"{b['adapter_params_ratio']:.3f}"
        print(f"  {entry['task']:<6} {entry['method_name']}: variant {entry['variant'] or '-'}, rank total "
              f"{fmt({'mean': b['rank_budget_total']}, digits=0)}, adapter params "
              f"{fmt({'mean': b['adapter_params']}, digits=0)} (x{ratio} of LoRA)")
        for c in entry["comparisons"]:
            if c["against"] is None:
                print(f"    vs {c['role']}: {c['reason']}")
                continue
            s = c["example_summary"]
            print_seed_level(c["seed_level"], f"{entry['method_name']} - {c['against']}")
            print(f"  {'':<6} {'':<34} per seed: McNemar p < 0.05 in {s['n_mcnemar_significant']}/{s['n_tests']} "
                  f"({s['n_mcnemar_significant_adjusted']} after Holm over the seeds)")


def print_verdict(agg: dict) -> None:
    """The hypotheses' verdicts (report.md opens with them, with the rule and what they cannot say)."""
    print("\nverdict (config/hypotheses.yaml; rule and scope in report.md):")
    for e in agg["hypotheses"]:
        ci = "-" if not e["ci"] else f"[{e['ci'][0]:.4g}, {e['ci'][1]:.4g}]"
        estimate = "-" if e["estimate"] is None else f"{e['estimate']:.4g}"
        print(f"  {e['id']:<4} {e['task']:<12} {estimate:>9} {ci:<20} margin {e['margin']:g}  n = {e['n']}  "
              f"{e['status']}" + (f" ({e['reason']})" if e["reason"] else ""))


def main(argv=None) -> int:
    args = parse_args(argv)
    kinds = check_methods(args.methods)
    start = time.perf_counter()
    walls = {}
    for task in args.tasks:
        for seed in args.seeds:  # seed-major: a partial benchmark still has every method for the first seeds
            for method in args.methods:
                walls[(task, method, seed)] = train(method, kinds[method], task, seed, args)
    ids = [run_id(m, t) for t in args.tasks for m in args.methods]
    if subprocess.run([sys.executable, "-m", "src.evaluate", f"results_dir={args.results_dir}",
                       f"run_ids={json.dumps(ids)}"], cwd=REPO).returncode:
        sys.exit("bench/accuracy.py: src.evaluate failed (its error is above)")
    agg = json.loads((Path(args.results_dir) / "comparison" / "aggregated_metrics.json").read_text())
    print()
    print_table(agg)
    print_ablation(agg)
    print_verdict(agg)
    print(f"\nbenchmark wall time: {(time.perf_counter() - start) / 60:.1f} min "
          f"({sum(1 for w in walls.values() if w)} runs trained, report in {args.results_dir}/comparison/report.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
