"""Tuning protocol: every method's learning rate and its own knobs tuned with the same Optuna budget on the tuning
split (held out from train, never the dev set), then the tuned demo configs written from the best values, then the
untuned and tuned configs trained on the same seeds and evaluated together; prints them side by side.

    uv sync --group demo && uv run python bench/tuning.py       # 4 studies x 8 trials, then 24 seed runs
    uv run python bench/tuning.py --trials 16 --seeds 42 43 44 45 46 --set training.eval_every_steps=null
    uv run python bench/tuning.py --seeds-dir results/study     # the untuned seeds a study already trained are reused

1. Study: `src.main run={method}-MiniLM-L6-22M--GLUE-SST-2 mode=full optuna.n_trials=N` (the contract CLI; its
   search space is the run config's `optuna.search_space`), under {results_dir}/study. A finished study is read,
   not run again; every method's study must hold exactly N finished (complete or pruned) trials.
2. `config/run/{method}-tuned-MiniLM-L6-22M--GLUE-SST-2.yaml`: the method's demo config (as `defaults`) with the
   study's best values at their config paths, `variant: tuned` and `optuna.n_trials: 0`. Written after every study
   has passed the check; a tuned config that exists with other values stops the script unless `--rewrite` is given.
3. bench/study.py over {method} and {method}-tuned for every method and seed, under `--seeds-dir` (default
   {results_dir}/seeds; finished runs there are skipped, so a study's untuned seeds are reused; a tuned seed run
   trained with other values than the tuned config's stops the script); then src.evaluate over all of them: each tuned group against its own untuned config and against the other tuned methods (report.md,
   "Ablation and controls").

`--set` reaches the seed runs only: the studies run the demo configs as shipped (their evaluations during training
give the optimisation-history figures). The trial budget is the same count for every method, over search spaces of
different size (LoRA: the learning rate; AdaLoRA, GLoRA and EVA: the learning rate and their own knobs). Optuna's
TPE sampler draws its first `optuna.sampler.n_startup_trials` (4) trials at random and models the finished ones
after that, so 8 trials are 4 random and 4 modelled draws (Optuna's default of 10 start-up trials would make the
whole budget a random search). A best value within `optuna.edge_tolerance` of its range's end is printed as at the
edge.

No trial is pruned (`--pruner none`, the default): every method gets the same 8 full trials. With the median
pruner, a trial's fate at its first evaluation (20% of the run, after 2 start-up trials) hung on whether an earlier
trial of the same study had diverged, by a few of the 800 tuning-split examples: in the first protocol run it ended
6 of GLoRA's 8 trials (among them the learning rates where LoRA found its best) and 3 of LoRA's.
A finished study run under another pruner is not read (use another --results-dir).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import study as A  # noqa: E402  (bench/study.py: runs the seeds, evaluates, prints its tables)

from src.main import SEARCH_KEYS  # noqa: E402

TUNED = "tuned"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default="results/tuning")
    p.add_argument("--methods", nargs="+", default=[*A.METHODS, "comparative-3"], metavar="PREFIX")
    p.add_argument("--trials", type=int, default=8, help="Optuna trials per method (the same for every method)")
    p.add_argument("--seeds", nargs="+", type=int, default=[A.DEFAULT_SEED, A.DEFAULT_SEED + 1, A.DEFAULT_SEED + 2])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra overrides for the seed runs (untuned and tuned alike), e.g. training.eval_every_steps=null")
    p.add_argument("--seeds-dir", default=None,
                   help="where the seed runs go (default {results_dir}/seeds); a study's folder reuses its runs")
    p.add_argument("--rewrite", action="store_true", help="replace existing tuned configs with this study's values")
    p.add_argument("--pruner", default="none", choices=["none", "median", "percentile", "hyperband"],
                   help="optuna.pruner.type of every study (default none: the same full trials for every method)")
    args = p.parse_args(argv)
    if args.trials < 1:
        p.error("--trials must be at least 1")
    args.results_dir = str(Path(args.results_dir).resolve())  # the runs start in the repository root
    args.seeds_dir = str(Path(args.seeds_dir).resolve()) if args.seeds_dir else str(Path(args.results_dir) / "seeds")
    return args


def study(method: str, args) -> tuple[Path, dict]:
    """Run (or read) one method's study through the CLI; returns the folder of its final run and its summary."""
    rid = f"{method}-{A.DEMO}"
    folder = Path(args.results_dir) / "study" / rid
    if not (folder / "summary.json").exists():
        cmd = [sys.executable, "-u", "-m", "src.main", f"run={rid}", f"results_dir={Path(args.results_dir) / 'study'}",
               "mode=full", "wandb.mode=disabled", f"optuna.n_trials={args.trials}", f"optuna.pruner.type={args.pruner}"]
        print(f"[tuning] {' '.join(cmd[2:])}", flush=True)
        if subprocess.run(cmd, cwd=REPO).returncode:
            sys.exit(f"bench/tuning.py: the study of {rid} failed (its error is above); re-run to continue")
    summary = json.loads((folder / "summary.json").read_text())
    pruner = OmegaConf.select(OmegaConf.load(folder / "config.yaml"), "optuna.pruner.type")
    if pruner != args.pruner:
        sys.exit(f"bench/tuning.py: {folder} holds a study run with pruner {pruner!r}, not --pruner {args.pruner}: "
                 f"the methods would not share one protocol; use another --results-dir")
    done = (summary.get("n_trials_complete") or 0) + (summary.get("n_trials_pruned") or 0)
    if done != args.trials:
        sys.exit(f"bench/tuning.py: {folder} holds a study of {done} finished trials, not {args.trials}: the methods "
                 f"would not share one tuning budget; use another --results-dir")
    return folder, summary


def best_values(folder: Path, kind: str) -> dict[str, object]:
    """config path -> best value, from the final run's own config (src.main stores optuna.best_params there)."""
    cfg = OmegaConf.load(folder / "config.yaml")
    best = OmegaConf.to_container(cfg.optuna.best_params)
    return {SEARCH_KEYS[kind].get(key, key): value for key, value in best.items()}


def tuned_config(method: str, summary: dict, values: dict, trials: int) -> str:
    """The tuned run config: a delta over the method's demo config."""
    base = A.run_config(method)
    doc = OmegaConf.create({"defaults": [f"{method}-{A.DEMO}", "_self_"], "run_id": f"{method}-{TUNED}-{A.DEMO}",
                            "method_name": f"{base.method_name} (tuned)", "variant": TUNED})
    for path, value in values.items():
        OmegaConf.update(doc, path, value, force_add=True)
    OmegaConf.update(doc, "optuna.n_trials", 0, force_add=True)
    head = (f"# @package _global_\n# {base.method_name} with the best values of its Optuna study (bench/tuning.py): "
            f"{trials} trials on the tuning split\n# (optuna.holdout_fraction of train), best "
            f"{base.optuna.metric} {summary['best_trial_value']:.4f}; the search space is the demo config's.\n")
    return head + OmegaConf.to_yaml(doc)


def check_seed_runs(method: str, values: dict, args) -> None:
    """A tuned run already in {results_dir}/seeds was trained with the tuned config's values, or the script stops."""
    rid = f"{method}-{TUNED}-{A.DEMO}"
    for seed in args.seeds:
        folder = A.run_folder(args.seeds_dir, rid, seed)
        if (folder / "config.yaml").exists():
            cfg = OmegaConf.load(folder / "config.yaml")
            used = {p: OmegaConf.select(cfg, p) for p in values}
            if used != values:
                sys.exit(f"bench/tuning.py: {folder} was trained with {used}, the tuned config has {values}; "
                         f"remove it (or use another --results-dir) to train it anew")


def print_trials(name: str, folder: Path) -> None:
    """Every trial of a study, in order: what was drawn (random start-up or modelled), its state and tuning-split
    score, so that the search each method got can be compared, not only its best point."""
    # the study lives per run config beside the runs ({results_dir}/optuna/{run_id}/); records from before that
    # change hold it inside the run folder
    shared = folder.parent / "optuna" / folder.name
    trials = json.loads(((shared if shared.is_dir() else folder / "optuna") / "trials.json").read_text())
    keys = sorted({k for t in trials for k in t["params"]})
    print(f"\n{name}: {len(trials)} trials (tuning-split {OmegaConf.load(folder / 'config.yaml').optuna.metric})")
    print(f"{'#':>3} {'state':<9} {'value':>7}  " + "  ".join(f"{k:>22}" for k in keys))
    for t in trials:
        cells = [t["params"].get(k) for k in keys]
        print(f"{t['number']:>3} {t['state'].lower():<9} {'-' if t['value'] is None else format(t['value'], '.4f'):>7}  "
              + "  ".join(f"{'-' if c is None else (format(c, '.3g') if isinstance(c, float) else str(c)):>22}"
                          for c in cells))


def side_by_side(agg: dict, methods: list[str], names: dict[str, str]) -> None:
    """Untuned and tuned per method, the paired difference, and the tuned methods against tuned LoRA."""
    task = next(iter(agg["groups"]))
    groups = agg["groups"][task]
    tests = {(e["method_name"], c["against"]): c["seed_level"] for e in agg["ablation"] for c in e["comparisons"]
             if c.get("against")}
    print(f"\ntuned vs untuned ({task}, dev accuracy %, mean ± std over seeds; tuned - untuned: glue_score, paired by "
          f"seed, t-test p and MDE at power 0.8; the last two columns: differences of means, untested):")
    head = f"{'method':<10} {'untuned':>14} {'tuned':>14} {'tuned - untuned':>16} {'t-test p':>9} {'MDE':>6}   " \
           f"{'untuned - LoRA':>16} {'tuned - t. LoRA':>16}"
    print(head + "\n" + "-" * len(head))
    lora = names.get("comparative-2", "LoRA")
    lora_tuned = f"{lora} (tuned)"
    for m in methods:
        name, tuned = names[m], f"{names[m]} (tuned)"
        t = tests.get((tuned, name)) or {}
        p = (t.get("tests") or [{}])[0].get("p_value")
        mde, diff = (t.get("mde") or {}).get("mde"), t.get("mean_difference")
        gains = [_mean(groups, a) - _mean(groups, b) if None not in (_mean(groups, a), _mean(groups, b)) else None
                 for a, b in ((name, lora), (tuned, lora_tuned))]
        print(f"{name:<10} {A.fmt(groups.get(name, {}).get('accuracy'), 100):>14} "
              f"{A.fmt(groups.get(tuned, {}).get('accuracy'), 100):>14} "
              f"{'-' if diff is None else f'{100 * diff:+.2f}':>16} "
              f"{'-' if p is None else f'{p:.2g}':>9} {'-' if mde is None else f'{100 * mde:.2f}':>6}   "
              + "".join(f"{'-' if g is None else f'{100 * g:+.2f}':>16} " for g in gains))


def _mean(groups: dict, name: str):
    return ((groups.get(name) or {}).get("accuracy") or {}).get("mean")


def main(argv=None) -> int:
    args = parse_args(argv)
    kinds = A.check_methods(args.methods)
    variants = [m for m in args.methods if A.run_config(m).get("variant")]
    if variants:
        sys.exit(f"bench/tuning.py: --methods takes main configs only (no variant); {' '.join(variants)} are variants")
    names = {m: A.run_config(m).method_name for m in args.methods}
    studies = {m: study(m, args) for m in args.methods}  # every study, checked, before any config is written
    for method, (folder, summary) in studies.items():
        print_trials(names[method], folder)
    for method, (folder, summary) in studies.items():
        values = best_values(folder, kinds[method])
        path = A.RUN_DIR / f"{method}-{TUNED}-{A.DEMO}.yaml"
        print(f"[tuning] {names[method]}: {summary['n_trials_complete']} complete + {summary['n_trials_pruned']} "
              f"pruned trials, best tuning-split {summary['best_trial_value']:.4f} with {values} -> "
              f"{path.relative_to(REPO)}", flush=True)
        for key, side in (summary.get("best_params_at_edge") or {}).items():
            print(f"[tuning] {names[method]}: best {key} is at the {side} end of its search range (the optimum may "
                  f"lie beyond it: widen the range)", flush=True)
        if path.exists() and not args.rewrite:
            shipped = {p: OmegaConf.select(A.run_config(f"{method}-{TUNED}"), p) for p in values}
            if shipped != values:
                sys.exit(f"bench/tuning.py: {path.name} exists with {shipped}, not this study's values; --rewrite "
                         f"replaces it")
        else:
            path.write_text(tuned_config(method, summary, values, args.trials))
        check_seed_runs(method, values, args)
    runs = [m for method in args.methods for m in (method, f"{method}-{TUNED}")]
    A.main(["--results-dir", args.seeds_dir, "--methods", *runs,
            "--seeds", *map(str, args.seeds), *(["--set", *args.set] if args.set else [])])
    agg = json.loads((Path(args.seeds_dir) / "comparison" / "aggregated_metrics.json").read_text())
    side_by_side(agg, args.methods, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
