"""Cost that survives a shared machine: the demo's three runs on an idle machine, then again while another process
loads every core, and what src.evaluate says about each set; beside them, each trial run's forecast of the full run
against the full run's real wall time.

    uv sync --group demo && uv run python bench/cost_under_load.py     # about 45 min on 2 cores

Phases (finished runs are skipped, so an interrupted benchmark continues; wall times are kept in walls.json):
trial runs (their forecasts) -> idle full runs -> the same full runs with a numpy matmul loop using every core ->
`src.evaluate` over each set -> a table. Nothing else may run on the machine meanwhile: the idle phase is the
reference. Accuracy must not move under load (CPU runs are deterministic); only the clock does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from src.evaluate import atomic_write  # noqa: E402  (evaluate imports nothing from the training side)

DEMO = "MiniLM-L6-22M--GLUE-SST-2"
METHODS = {"comparative-2": "LoRA", "comparative-1": "AdaLoRA", "proposed": "GLoRA"}
HOG = """
import numpy as np
a = np.random.rand(1500, 1500)
while True:
    a = a @ a
    a /= np.abs(a).max()
"""


def run_id(method: str) -> str:
    return f"{method}-{DEMO}"


def train(results: Path, method: str, mode: str) -> float | None:
    """One CLI run; its wall time in seconds, or None when it had finished earlier (the CLI skips it)."""
    if mode == "full" and (results / run_id(method) / "summary.json").exists():
        return None
    cmd = [sys.executable, "-u", "-m", "src.main", f"run={run_id(method)}", f"results_dir={results}", f"mode={mode}",
           "wandb.mode=disabled"]
    print("[bench]", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    return time.perf_counter() - start


def evaluate(results: Path) -> dict:
    ids = json.dumps([run_id(m) for m in METHODS])
    subprocess.run([sys.executable, "-m", "src.evaluate", f"results_dir={results}", f"run_ids={ids}"], cwd=REPO,
                   check=True)
    return json.loads((results / "comparison" / "aggregated_metrics.json").read_text())


def full_runs(results: Path, walls: dict, key: str, walls_file: Path) -> None:
    for m in METHODS:
        wall = train(results, m, "full")
        if wall is not None:
            walls[f"{key}/{m}"] = wall
            atomic_write(walls_file, lambda tmp: Path(tmp).write_text(json.dumps(walls, indent=2)))


def summary(results: Path, method: str) -> dict:
    return json.loads((results / run_id(method) / "summary.json").read_text())


def ratio_text(r: dict | None) -> str:
    if not r or r.get("value") is None:
        return "-"
    return f"x{r['value']:.2f}" + ("" if r.get("comparable") else " (not comparable)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results-dir", default="results/cost_under_load")
    ap.add_argument("--hog-threads", type=int, default=os.cpu_count() or 2, help="threads of the loading process")
    args = ap.parse_args(argv)
    root = Path(args.results_dir).resolve()
    trial, idle, loaded = root / "trial", root / "idle", root / "loaded"
    walls_file = root / "walls.json"
    root.mkdir(parents=True, exist_ok=True)
    walls = json.loads(walls_file.read_text()) if walls_file.exists() else {}

    for m in METHODS:
        train(trial, m, "trial")
    full_runs(idle, walls, "idle", walls_file)
    if not all((loaded / run_id(m) / "summary.json").exists() for m in METHODS):
        threads = str(args.hog_threads)
        env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        hog = subprocess.Popen([sys.executable, "-c", HOG], env=env)
        try:
            time.sleep(5)
            full_runs(loaded, walls, "loaded", walls_file)
        finally:
            hog.kill()
            hog.wait()
    reports = {"idle": evaluate(idle), "loaded": evaluate(loaded)}

    print(f"\n{'method':8s} {'set':7s} {'dev acc':>8s} {'train s':>8s} {'wall s':>8s} {'step med s':>10s} "
          f"{'unexpl. IQR':>11s} {'jitter':>6s} {'CPU use':>7s} {'step ratio':>20s} {'train ratio':>20s}")
    for m, name in METHODS.items():
        for key, results in (("idle", idle), ("loaded", loaded)):
            s = summary(results, m)
            st, env = s.get("step_time_s") or {}, s.get("environment") or {}
            use = s["cpu_time_s"] / (s["train_time_s"] * env["cpu_threads"]) if env.get("cpu_threads") else None
            der = reports[key]["derived"][s["task"]]["methods"].get(name, {})
            wall = walls.get(f"{key}/{m}")
            print(f"{name:8s} {key:7s} {s['accuracy']:8.4f} {s['train_time_s']:8.1f} "
                  f"{(f'{wall:.1f}' if wall else '-'):>8s} {st.get('median', float('nan')):10.3f} "
                  f"{st.get('unexplained_iqr', float('nan')):11.3f} {st.get('unexplained_jitter', float('nan')):6.3f} "
                  f"{(f'{use:.2f}' if use else '-'):>7s} "
                  f"{ratio_text(der.get('step_time_ratio')):>20s} {ratio_text(der.get('train_time_s_ratio')):>20s}")
    print("\nreasons given for ratios marked not comparable:")
    for key in ("idle", "loaded"):
        for task in reports[key]["derived"].values():
            for name, d in task["methods"].items():
                for r in ("step_time_ratio", "train_time_s_ratio"):
                    if d.get(r) and not d[r].get("comparable"):
                        print(f"  {key:7s} {name:8s} {r}: {d[r].get('reason')}")
    print("\ntrial forecast of the full run vs its real wall time on the idle machine:")
    for m, name in METHODS.items():
        f, wall = summary(trial, m).get("forecast_full_run_s"), walls.get(f"idle/{m}")
        err = f"{(f / wall - 1) * 100:+.1f}%" if f and wall else "- (no wall time: the idle run finished earlier)"
        print(f"  {name:8s} forecast {f:.1f} s, real {(f'{wall:.1f} s' if wall else '-')}, error {err}")


if __name__ == "__main__":
    main()
