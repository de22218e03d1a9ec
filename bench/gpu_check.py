"""GPU readiness check, and the rates a study's GPU forecast is made from: run it first on new hardware.

For every run config (default: DeBERTa-v3-base on MNLI; LoRA, AdaLoRA, GLoRA, EVA), in each precision (default: the
configs' own, `auto`), it does what the study's runs will do, with the run's own code:

- batches as the run makes them: the task's examples (from `dataset.data_dir` / `--data-dir`, or the hub) through
  the run's loader (batch size, max_length, `group_by_length`, collator, loader workers); when the files cannot be
  read, random tokens at lengths drawn from an MNLI-like length model (LENGTH_MODEL; said so in the table and JSON);
- `--steps` optimizer steps of the training step (src.train.forward_backward / optimizer_step) with the schedules
  placed inside the timed window: GLoRA reallocates at the middle step, AdaLoRA budgets (masking every
  `mask_interval` steps) and then trains its last third at the final ranks; EVA's data pass runs first;
- an evaluation (src.train.evaluate_split) on `--eval-batches` batches of the first dev split;
- a checkpoint on the device (src.train.Checkpoints) after the last step: one more step is taken, the checkpoint
  restored into a set-up built afresh (as a resumed run's) and that step retaken: loss and weights must agree
  (RESUME_RTOL);
- with 2 or more GPUs visible (or `--data-parallel on`), the GLoRA config in `mode=trial` on 2 processes under
  torchrun: its reallocation and the cross-process checks under data parallel.

It prints per method x precision the step time per phase, peak memory, host syncs per step (GPU), dtypes, and "ok"
or the first fault (exit 1 when a row faulted); writes the measured rates (`--out`, JSON: per method and phase the
seconds per padded token, evaluation and tokenising rates, each `--tasks` task's sizes and a sample of its token
lengths); and ends with the forecast of a study in GPU-hours on this node from those rates (bench/study.py's, which
`bench/study.py --plan --gpu-check FILE` prints for any study):

    uv run python bench/gpu_check.py                                 # DeBERTa-v3-base (hub), MNLI, SST-2, RTE
    uv run python bench/gpu_check.py --data-dir /data/glue --out results/gpu_check.json --runs-per-gpu 2
    uv run python bench/gpu_check.py --device cpu --backbone tiny/ --set adalora.total_rank_budget=48
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import src.main as main  # noqa: E402
from src import model as M  # noqa: E402
from src import preprocess as P  # noqa: E402
from src import train as T  # noqa: E402

BACKBONE = "DeBERTa-v3-base-86M"
METHODS = ["comparative-2", "comparative-1", "proposed", "comparative-3"]  # LoRA, AdaLoRA, GLoRA, EVA
RUNS = [f"{m}-{BACKBONE}--GLUE-MNLI" for m in METHODS]
# Token lengths (special tokens included) of a task whose files are absent: log-normal with this median and 95th
# percentile. MNLI-like: a premise of about 22 words and a hypothesis of about 11 (Williams et al., 2018) at about
# 1.1 sub-word tokens a word, and a tail of long premises; a batch of 32 then pads to about 100 tokens.
LENGTH_MODEL = {"median": 38, "p95": 85}
RESUME_RTOL = 1e-3  # a GPU's reductions need not repeat bit for bit; on a CPU the retaken step is exact


def run_config(run_id: str, overrides: list[str], results_dir: str):
    """The run config as `mode=full` resolves it (no tracker, no trials). An override applies where its section
    exists (adalora.* to the AdaLoRA run only)."""
    given = [f"run={run_id}", "mode=full", f"results_dir={results_dir}", "wandb.mode=disabled", "optuna.n_trials=0"]
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base=None):
        sections = set(compose(config_name="config", overrides=given))
        cfg = compose(config_name="config", overrides=[*given, *(o for o in overrides if o.split(".")[0] in sections)])
    return main.prepare(cfg)


def window_schedule(cfg, steps: int):
    """The run's schedules placed inside `steps` timed steps: GLoRA's reallocation at the middle, AdaLoRA's budgeting
    from the first quarter and its final phase over the last third; no evaluations or checkpoints of the loop's own.
    Returns the config (every schedule key in steps) and the phase of each step 1..steps."""
    cfg = copy.deepcopy(cfg)
    kind = M.adapter_kind(cfg)
    cfg.training.lr_warmup_steps = 1
    cfg.training.eval_every_steps = cfg.training.checkpoint_every_steps = None
    cfg.optuna.pruner.n_warmup_steps = None
    if kind == "glora":
        cfg.glo_ra.warmup_steps = steps // 2
    if kind == "adalora":
        cfg.adalora.adaptation_start_step, cfg.adalora.final_steps = steps // 4, steps // 3
    cfg, _ = T.resolve_schedules(cfg, steps, steps)
    from study import phase_steps  # the forecast's phases, so a rate measured here is the one it weights

    phases = [p for p, n in phase_steps(kind, cfg, steps).items() for _ in range(n)]
    return cfg, dict(enumerate(phases, start=1))


def model_lengths(n: int, max_length: int, seed: int = 0) -> np.ndarray:
    """n token lengths from LENGTH_MODEL, cut at max_length (truncation) and at least 3 (the special tokens)."""
    sigma = np.log(LENGTH_MODEL["p95"] / LENGTH_MODEL["median"]) / 1.6449
    draws = np.random.default_rng(seed).lognormal(np.log(LENGTH_MODEL["median"]), sigma, n)
    return np.clip(np.rint(draws), 3, max_length).astype(int)


def task_data(task: str, cfg, tokenizer, vocab: int, n_train: int, n_eval: int) -> dict:
    """A task's examples for the check and what a forecast needs of it: the sizes of its splits, samples of its train
    and dev token lengths, the tokenizer's seconds per example; `data`: n_train + n_eval tokenised examples. From the
    task's files (or the hub) when they can be read; else LENGTH_MODEL's lengths, random tokens, GLUE_SIZES. A task
    folder that is in the given data_dir but cannot be read stops the check (the lengths would be a guess)."""
    spec = P.TASKS[task]
    d = cfg.dataset
    try:
        raw = P.load_glue(task, d.data_dir, d.cache_dir)
    except P.DataError as e:
        if d.data_dir is not None and (Path(d.data_dir) / spec.folder).exists():  # there, but broken: not a guess
            raise SystemExit(f"gpu_check: {Path(d.data_dir) / spec.folder} cannot be read: {e}") from None
        raw, reason = None, str(e).split(";")[0]
    if raw is not None:
        eval_split = next(s for s in raw if s != "train")
        train_lengths, per_example = P.sample_lengths(raw["train"], tokenizer, d.max_length)
        eval_lengths, _ = P.sample_lengths(raw[eval_split], tokenizer, d.max_length)
        small = DatasetDict({"train": P.subsample(raw["train"], n_train),
                             "validation": P.subsample(raw[eval_split], n_eval)})
        return {"source": "files", "sizes": {s: len(ds) for s, ds in raw.items()},
                "train_lengths": train_lengths.tolist(), "eval_lengths": eval_lengths.tolist(),
                "tokenize_s_per_example": per_example, "data": P.tokenize(small, tokenizer, d.max_length)}
    rng = torch.Generator().manual_seed(0)
    train_lengths, eval_lengths = model_lengths(1024, d.max_length, 0), model_lengths(1024, d.max_length, 1)

    def token_ids(lengths) -> list[list[int]]:
        return [[tokenizer.cls_token_id or 1, *torch.randint(5, vocab, (int(n) - 2,), generator=rng).tolist(),
                 tokenizer.sep_token_id or 2] for n in lengths]

    def examples(lengths) -> Dataset:
        ids = token_ids(lengths)
        labels = (torch.rand(len(ids), generator=rng) * 5).tolist() if spec.is_regression else \
            torch.randint(0, spec.num_labels, (len(ids),), generator=rng).tolist()
        return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": labels,
                                  "idx": list(range(len(ids)))})

    data = DatasetDict({"train": examples(model_lengths(n_train, d.max_length, 2)),
                        "validation": examples(model_lengths(n_eval, d.max_length, 3))})
    texts = tokenizer.batch_decode(token_ids(train_lengths[:256]), skip_special_tokens=True)
    tic = time.perf_counter()  # the tokenizer's speed on text of the model's lengths
    tokenizer(texts, truncation=True, max_length=d.max_length)
    return {"source": f"length model (median {LENGTH_MODEL['median']}, p95 {LENGTH_MODEL['p95']} tokens): {reason}",
            "sizes": dict(P.GLUE_SIZES[task]), "train_lengths": train_lengths.tolist(),
            "eval_lengths": eval_lengths.tolist(), "tokenize_s_per_example": (time.perf_counter() - tic) / len(texts),
            "data": data}


class SyncCounter:
    """Host syncs inside a block, as torch's CUDA sync debug mode reports them (a warning per synchronising call)."""

    def __init__(self, device: torch.device):
        self.cuda, self.count = device.type == "cuda", 0

    def __enter__(self):
        if self.cuda:
            self._warnings = warnings.catch_warnings(record=True)
            self._seen = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self.count = sum("synchroniz" in str(w.message) for w in self._seen)
            self._warnings.__exit__(*exc)


def dtypes(tensors) -> str:
    return ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors})) or "-"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def check_one(cfg, base, tokenizer, device: torch.device, steps: int, task: dict, eval_batches: int) -> dict:
    """One method in one precision: the timed steps, an evaluation, a checkpoint saved and resumed; the row of the
    table and the method's rates."""
    requested = cfg.hardware.precision
    precision = T.check_precision(requested, device)  # TrainingError: the device lacks it
    if requested != "auto" and precision != requested:
        raise T.TrainingError(f"{device} has no {requested.upper()} (the {precision} row is it)")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    cfg, phases = window_schedule(cfg, steps)
    M.check_budget(cfg, base, steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    d = cfg.dataset
    train_loader, eval_loaders = P.make_loaders(task["data"], tokenizer, d.batch_size,
                                                d.eval_batch_size, cfg.seed, d.num_workers, device.type == "cuda",
                                                d.get("group_by_length", False))
    batches = []
    while len(batches) < steps + 1:  # the run's batches, in its order (an epoch of the check's examples repeats)
        batches += list(train_loader)
    # the loader's grouping sorts each mega-batch longest first: shuffled (fixed seed), so that no phase of the
    # window gets the long batches and the per-token rates compare phases, not lengths
    batches = batches[:steps + 1]
    random.Random(0).shuffle(batches)
    model = M.build_adapter(cfg, copy.deepcopy(base), steps).to(device)
    model.train()
    tic = time.perf_counter()
    _, init = M.prepare_adapter(cfg, model, lambda size: P.make_loaders(task["data"], tokenizer, size, size,
                                                                        cfg.seed)[0], device, progress=False)
    init_s = time.perf_counter() - tic
    # what a resumed run has built when it restores: the set-up before any step (kept on the host, out of the peak)
    initial = copy.deepcopy(model.cpu())
    model.to(device)

    def set_up(model) -> tuple:
        optimizer = T.build_optimizer(model, cfg.training)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        return model, optimizer, scheduler, M.make_hook(cfg, model, optimizer)

    model, optimizer, scheduler, hook = set_up(model)
    T.check_fp32_state(model, optimizer)
    per_step, notes = [], []
    for step, batch in enumerate(batches[:steps], start=1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        with SyncCounter(device) as counter:
            loss = T.forward_backward(model, batch, device, autocast)
            event = T.optimizer_step(model, optimizer, scheduler, hook, step, cfg.training.max_grad_norm)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - tic
        if not torch.isfinite(loss):
            raise T.TrainingError(f"loss {loss.item()} at step {step}: "
                                  f"{T.nonfinite_cause(model, precision, scheduler.get_last_lr()[0])}")
        phase = phases[step]
        if event is not None:
            ranks = sorted(event["new_ranks"].values())
            notes.append(f"reallocated at step {step}: ranks {ranks[0]}..{ranks[-1]}, {seconds:.3f} s")
            phase = "reallocation"  # a one-off: kept out of the phases' rates
        per_step.append((phase, seconds, int(batch["input_ids"].numel()), counter.count))
    T.check_fp32_state(model, optimizer)
    timed = per_step[1:]  # the first step pays one-off set-up
    rates = {}
    for phase in dict.fromkeys(p for p, *_ in timed if p != "reallocation"):
        rows = [r for r in timed if r[0] == phase]
        rates[phase] = {"steps": len(rows), "s_step_median": statistics.median(r[1] for r in rows),
                        "tokens_mean": statistics.fmean(r[2] for r in rows),
                        "step_s_per_token": sum(r[1] for r in rows) / sum(r[2] for r in rows),
                        "syncs_median": statistics.median(r[3] for r in rows) if device.type == "cuda" else None}
    evaluation = eval_rate(model, eval_loaders["validation"], P.TASKS[P.task_spec(d.name)[0]], device, autocast,
                           eval_batches)
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None  # the run's own
    resume = checkpoint_resume((model, optimizer, scheduler, hook), set_up(initial.to(device)), device, precision,
                               batches[steps], autocast, cfg)
    del initial
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.is_floating_point()]
    return {"precision": precision, "phases": rates, "init_s": init_s if init else 0.0,
            "reallocation_s": next((s for p, s, *_ in per_step if p == "reallocation"), None),
            **evaluation, "resume": resume,
            "peak_mib": peak_mib,
            "trainable": dtypes(p for p in model.parameters() if p.requires_grad), "state": dtypes(state),
            "notes": notes + ([f"EVA pass: {init['eva_forward_passes']} forward passes, {init_s:.1f} s"]
                              if init else [])}


def eval_rate(model, loader, spec, device, autocast, n_batches: int) -> dict:
    """Seconds per padded token of an evaluation (evaluate_split's own code) over the first n_batches batches."""
    head = [b for _, b in zip(range(n_batches), loader)]
    tokens = sum(int(b["input_ids"].numel()) for b in head)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tic = time.perf_counter()
    preds, labels, loss = T.evaluate_split(model, head, spec, device, autocast)
    seconds = time.perf_counter() - tic
    if len(preds) != sum(len(b["labels"]) for b in head) or not np.isfinite(loss):
        raise T.TrainingError(f"evaluation returned {len(preds)} predictions, loss {loss}")
    return {"eval_s_per_token": seconds / tokens, "eval_examples": len(preds)}


def checkpoint_resume(live: tuple, fresh: tuple, device, precision, batch, autocast, cfg) -> dict:
    """Save a checkpoint of the `live` set-up (model, optimizer, scheduler, hook), take one step on it; restore the
    checkpoint into the `fresh` set-up (built as the run built it, before any step: what a resumed process has, so
    state the checkpoint lacks shows) and retake that step there: the two must agree."""
    def one_step(parts: tuple, step: int) -> tuple[float, dict]:
        model, optimizer, scheduler, hook = parts
        loss = T.forward_backward(model, batch, device, autocast)
        T.optimizer_step(model, optimizer, scheduler, hook, step, cfg.training.max_grad_norm)
        return float(loss), trainable_state(model)

    step = live[2].last_epoch  # the optimizer steps taken
    with tempfile.TemporaryDirectory() as folder:
        tic = time.perf_counter()
        path = T.Checkpoints(Path(folder), *live, keep=1, device=device, precision=precision).save(
            T.LoopState(step=step))
        save_s = time.perf_counter() - tic
        size = sum(f.stat().st_size for f in path.iterdir())
        first_loss, first = one_step(live, step + 1)
        tic = time.perf_counter()
        st = T.Checkpoints(Path(folder), *fresh, keep=1, device=device, precision=precision).restore_latest()
        load_s = time.perf_counter() - tic
        again_loss, again = one_step(fresh, step + 1)
    if st.step != step:
        raise T.TrainingError(f"the checkpoint of step {step} restored step {st.step}")
    loss_diff = abs(first_loss - again_loss) / max(abs(first_loss), 1e-12)
    weight_diff = max(float((first[n] - again[n]).abs().max() / first[n].abs().max().clamp_min(1e-12))
                      for n in first)
    if not (loss_diff <= RESUME_RTOL and weight_diff <= RESUME_RTOL):
        raise T.TrainingError(f"the step retaken after restoring the checkpoint differs: loss by {loss_diff:.2e}, "
                              f"weights by {weight_diff:.2e} (relative; at most {RESUME_RTOL} expected)")
    return {"save_s": save_s, "load_s": load_s, "mib": size / 2**20, "loss_rdiff": loss_diff,
            "weights_rdiff": weight_diff}


def data_parallel_check(run_id: str, overrides: list[str], device: torch.device, timeout: int = 900) -> dict:
    """The run config in mode=trial on 2 processes (torchrun; NCCL on GPUs, gloo on the CPU): rc, and what the run
    compared across its processes."""
    with tempfile.TemporaryDirectory() as results, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
        probe.close()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "-m", "src.main", f"run={run_id}", "mode=trial", f"results_dir={results}", *overrides]
        tic = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "TQDM_DISABLE": "1"})
        except subprocess.TimeoutExpired as e:  # a hang is this check's finding, not the end of the script
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            tail = (err.strip().splitlines() or ["no output"])[-1]
            return {"status": f"FAULT: no result after {timeout} s (last output: {tail})", "seconds": timeout}
        seconds = time.perf_counter() - tic
        summary = Path(results) / run_id / "summary.json"
        if proc.returncode or not summary.exists():
            lines = proc.stderr.strip().splitlines() or ["no output"]  # torchrun ends with its own banner
            tail = next((x.strip() for x in reversed(lines) if "error" in x.lower() and "ChildFailedError" not in x),
                        lines[-1])
            return {"status": f"FAULT: rc {proc.returncode}: {tail}", "seconds": seconds}
        s = json.loads(summary.read_text())
    return {"status": "ok", "seconds": seconds, "processes": s.get("processes"),
            "cross_process_checks": s.get("cross_process_checks"), "final_ranks": s.get("final_ranks"),
            "device": str(device.type)}


def forecast(result: dict, args) -> None:
    """The study's forecast from the rates just measured (bench/study.py's)."""
    import study

    plan_args = study.parse_args(["--backbone", args.study_backbone, "--tasks", *args.study_tasks,
                                  "--methods", *args.study_methods, "--seeds", *map(str, args.seeds),
                                  "--runs-per-gpu", str(args.runs_per_gpu), "--results-dir",
                                  tempfile.mkdtemp(prefix="gpu-check-plan-")])
    plan_args.gpu_check = args.out
    runs = study.matrix(plan_args)
    study.print_gpu_forecast(runs, plan_args, result, gpus=args.gpus or max(1, torch.cuda.device_count()))


def main_(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=RUNS, help="run ids, one task (default: DeBERTa-v3-base, MNLI)")
    ap.add_argument("--backbone", help="model.backbone (hub id or save_pretrained folder); default: the run config's")
    ap.add_argument("--data-dir", help="dataset.data_dir: a GLUE folder in the official layout (default: the hub)")
    ap.add_argument("--device", default="auto", help="hardware.device (auto | cpu | cuda | cuda:N)")
    ap.add_argument("--precisions", nargs="+", default=None, choices=T.PRECISIONS,
                    help="default: each config's own (the rates are recorded for the first)")
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per row (the first is not timed)")
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--tasks", nargs="+", default=["MNLI", "SST-2", "RTE"], metavar="TASK",
                    choices=[s.folder for s in P.TASKS.values()],
                    help="tasks whose sizes and lengths the forecast needs (their files, or the length model)")
    ap.add_argument("--data-parallel", default="auto", choices=["auto", "on", "off"],
                    help="the 2-process check: auto = when 2 or more GPUs are visible")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    ap.add_argument("--out", default="gpu_check.json", help="the measured rates (JSON), for study.py --gpu-check")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="the forecast study's seeds")
    ap.add_argument("--study-tasks", nargs="+", default=["MNLI", "SST-2", "RTE"])
    ap.add_argument("--study-methods", nargs="+", default=METHODS)
    ap.add_argument("--study-backbone", default=BACKBONE)
    ap.add_argument("--gpus", type=int, default=None, help="GPUs of the node (default: those visible)")
    ap.add_argument("--runs-per-gpu", type=int, default=1)
    args = ap.parse_args(argv)
    if args.steps < 6:
        ap.error(f"--steps {args.steps}: at least 6, so that every phase has a timed step (the first is not timed)")
    if args.data_dir and not Path(args.data_dir).is_dir():
        ap.error(f"--data-dir {args.data_dir}: no such folder (a GLUE folder in the official layout, e.g. "
                 f"{Path(args.data_dir) / 'MNLI' / 'train.tsv'})")
    overrides = [*args.set, f"hardware.device={args.device}"]
    overrides += [f"model.backbone={args.backbone}"] if args.backbone else []
    overrides += [f"dataset.data_dir={args.data_dir}"] if args.data_dir else []
    with tempfile.TemporaryDirectory() as results_dir:  # nothing is written there
        cfgs = [run_config(r, overrides, results_dir) for r in args.runs]
    first = cfgs[0]
    for cfg in cfgs:
        if cfg.model.backbone != first.model.backbone or cfg.dataset.name != first.dataset.name:
            raise SystemExit(f"--runs must share one backbone and task ({cfg.run_id} differs from {first.run_id})")
    device = T.pick_device(first.hardware.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    task, spec = P.task_spec(first.dataset.name)
    tic = time.perf_counter()
    tokenizer, base = M.load_backbone(first.model.backbone, spec.num_labels, first.model.cache_dir)
    load_s = time.perf_counter() - tic
    vocab = min(tokenizer.vocab_size, base.config.vocab_size)
    stored = str(M.stored_dtype(first.model.backbone, first.model.cache_dir)).removeprefix("torch.")
    env = T.environment(device, 1)
    gpu = f", compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}, " \
          f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB" if device.type == "cuda" else ""
    batch = first.dataset.batch_size
    checked = task_data(task, first, tokenizer, vocab, max(args.steps + 1, 64) * batch,
                        args.eval_batches * first.dataset.eval_batch_size)
    tasks = {spec.folder: checked}
    for name in args.tasks:  # the other tasks' sizes and lengths, for the forecast
        key = next(k for k, s in P.TASKS.items() if s.folder == name)
        if name not in tasks:
            tasks[name] = task_data(key, first, tokenizer, vocab, 0, 0)
    print(f"backbone {first.model.backbone}: stored {stored}, loaded as {dtypes(base.parameters())} in "
          f"{load_s:.1f} s | device {device} ({env['device_name']}{gpu}) | torch {env['torch']}, transformers "
          f"{env['transformers']}, peft {env['peft']}")
    print(f"{spec.folder}: batches of {batch} (max_length {first.dataset.max_length}, group_by_length "
          f"{first.dataset.get('group_by_length', False)}) from {checked['source']}; {args.steps} steps per row")
    for name, t in tasks.items():
        lengths = np.array(t["train_lengths"])
        print(f"  {name}: {t['sizes']} examples, train tokens median {np.median(lengths):.0f} / p95 "
              f"{np.percentile(lengths, 95):.0f}, from {t['source']}")
    header = (f"{'method':<9} {'precision':<9} {'phase':<12} {'s/step':>8} {'tokens':>7} {'peak MiB':>9} "
              f"{'syncs/step':>10} {'stored':>8} {'trainable':>9} {'opt state':>9}  status")
    print(header)
    print("-" * len(header))
    faults, methods = 0, {}
    for cfg in cfgs:
        for precision in args.precisions or [cfg.hardware.precision]:
            cfg.hardware.precision = precision
            try:
                row = check_one(cfg, base, tokenizer, device, args.steps, checked, args.eval_batches)
                status = "ok" + "".join(f" ({n})" for n in row["notes"]) + \
                    f" | eval {row['eval_s_per_token'] * 1e6:.2f} us/token | checkpoint {row['resume']['mib']:.1f} " \
                    f"MiB, save {row['resume']['save_s']:.2f} s, resume {row['resume']['load_s']:.2f} s, " \
                    f"retaken step equal within {max(row['resume']['loss_rdiff'], row['resume']['weights_rdiff']):.0e}"
                kind = M.adapter_kind(cfg)
                if kind not in methods:  # the rates of each method's first precision: its config's own by default
                    methods[kind] = {"run": cfg.run_id, "method_name": cfg.method_name, **{
                        k: v for k, v in row.items() if k not in ("notes", "trainable", "state")}}
            except T.TrainingError as e:
                row = {"status": f"skipped: {e}"} if "needs a GPU" in str(e) or "has no" in str(e) else \
                    {"status": f"FAULT: {e}"}
                status = row["status"]
            except Exception as e:  # the first fault of this row, whatever it is; the other rows still run
                message = str(e).strip().splitlines()[0] if str(e).strip() else ""
                status = f"FAULT: {type(e).__name__}: {message}"
                row = {}
            faults += status.startswith("FAULT")
            phases = row.get("phases") or {"-": {}}
            for i, (phase, r) in enumerate(phases.items()):
                fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
                print(f"{cfg.method_name:<9} {precision:<9} {phase:<12} {fmt(r.get('s_step_median'), '8.4f'):>8} "
                      f"{fmt(r.get('tokens_mean'), '7.0f'):>7} {fmt(row.get('peak_mib') if i == 0 else None, '9.0f'):>9} "
                      f"{fmt(r.get('syncs_median'), '10.0f'):>10} {stored if row.get('phases') else '-':>8} "
                      f"{row.get('trainable', '-'):>9} {row.get('state', '-'):>9}  {status if i == 0 else ''}",
                      flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    dp = None
    want_dp = args.data_parallel == "on" or (args.data_parallel == "auto" and torch.cuda.device_count() >= 2)
    glora = next((c for c in cfgs if M.adapter_kind(c) == "glora"), None)
    if want_dp and glora is not None:
        sections = set(glora)  # an override reaches the GLoRA run only where its section exists (adalora.* not)
        dp = data_parallel_check(glora.run_id, [o for o in overrides if not o.startswith("hardware.device=")
                                                and o.split(".")[0] in sections]
                                 + ([f"hardware.device={args.device}"] if device.type == "cpu" else []), device)
        faults += dp["status"].startswith("FAULT")
        checks = dp.get("cross_process_checks") or {}
        print(f"data parallel, 2 processes ({glora.run_id}, mode=trial): {dp['status']} in {dp['seconds']:.0f} s"
              + (f"; compared across processes: {checks}" if checks else ""))
    elif args.data_parallel == "auto":
        print(f"data parallel: not checked ({torch.cuda.device_count()} GPU visible; it needs 2)")
    result = {"environment": env, "backbone": str(first.model.backbone), "stored_dtype": stored, "load_s": load_s,
              "checked_task": spec.folder, "steps": args.steps, "methods": methods, "data_parallel": dp,
              "tasks": {k: {x: y for x, y in v.items() if x != "data"} for k, v in tasks.items()},
              "faults": faults}
    T.write_json_atomic(Path(args.out), result)
    print(f"rates written to {args.out} (bench/study.py --plan --gpu-check {args.out} forecasts any study from them)")
    if methods:
        forecast(result, args)
    return 1 if faults else 0


if __name__ == "__main__":
    sys.exit(main_())
