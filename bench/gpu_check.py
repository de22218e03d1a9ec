"""GPU readiness check: run it first on new hardware, before spending the hour.

Loads the backbone exactly as training does (src.model.load_backbone: a hub id or a save_pretrained folder, in float32
whatever its stored dtype), then for LoRA, AdaLoRA and GLoRA (through its reallocation) in each precision runs a few
optimizer steps of the training step itself (src.train.forward_backward / optimizer_step) on batches of the run
config's batch size padded to its max_length, the largest step the run takes. Prints per method x precision the step
time, peak memory, host syncs per step (GPU), the dtypes (stored, trainable, optimizer state) and "ok" or the first
fault; exits 1 when a row faulted. A precision the device lacks is listed as skipped, with the reason.

    uv run python bench/gpu_check.py                                  # DeBERTa-v3-base (hub), the SST-2 configs
    uv run python bench/gpu_check.py --runs {lora,adalora,glora run ids} --backbone path/to/folder
    uv run python bench/gpu_check.py --device cpu --backbone tiny/ --set adalora.total_rank_budget=48
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import src.main as main  # noqa: E402
from src import model as M  # noqa: E402
from src import preprocess as P  # noqa: E402
from src import train as T  # noqa: E402

RUNS = ["comparative-2-DeBERTa-v3-base-86M--GLUE-SST-2", "comparative-1-DeBERTa-v3-base-86M--GLUE-SST-2",
        "proposed-DeBERTa-v3-base-86M--GLUE-SST-2", "comparative-3-DeBERTa-v3-base-86M--GLUE-SST-2"]


def run_config(run_id: str, overrides: list[str], results_dir: str):
    """The run config as `mode=trial` checks it: its schedules shrunk so that AdaLoRA masks and GLoRA reallocates
    within a few steps (config.yaml's trial block). An override applies where its section exists (adalora.* to the
    AdaLoRA run only)."""
    given = [f"run={run_id}", "mode=trial", f"results_dir={results_dir}"]
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base=None):
        sections = set(compose(config_name="config", overrides=given))
        cfg = compose(config_name="config", overrides=[*given, *(o for o in overrides if o.split(".")[0] in sections)])
    return main.prepare(cfg)


def batches(cfg, vocab: int, num_labels: int, n: int, device: torch.device) -> list[dict]:
    """Random token ids at the run's batch size, padded to its max_length; pinned on a GPU, as the loader's are."""
    g = torch.Generator().manual_seed(0)
    b, length = cfg.dataset.batch_size, cfg.dataset.max_length
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (b, length), generator=g)
        labels = torch.rand(b, generator=g) * 5 if num_labels == 1 else torch.randint(0, num_labels, (b,), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        out.append({k: v.pin_memory() for k, v in batch.items()} if device.type == "cuda" else batch)
    return out


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


def check_one(cfg, base, device: torch.device, steps: int, vocab: int, num_labels: int) -> dict:
    """A few training steps of one method in one precision; the row of the table."""
    precision = T.check_precision(cfg.hardware.precision, device)  # TrainingError: the device lacks it
    if precision != cfg.hardware.precision:
        return {"status": f"skipped: {device} has no {cfg.hardware.precision.upper()} (the {precision} row is it)"}
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    cfg, _ = T.resolve_schedules(cfg, steps, steps)
    M.check_budget(cfg, base, steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = M.build_adapter(cfg, copy.deepcopy(base), steps).to(device)
    model.train()
    # EVA's data pass, as training runs it (on this check's own batches, 16 of them cycled until convergence)
    _, init = M.prepare_adapter(cfg, model, lambda size: batches(cfg, vocab, num_labels, 16, device), device,
                                progress=False)
    optimizer = T.build_optimizer(model, cfg.training)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    hook = M.make_hook(cfg, model, optimizer)
    T.check_fp32_state(model, optimizer)
    times, syncs, note = [], [], ""
    for step, batch in enumerate(batches(cfg, vocab, num_labels, steps, device), start=1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        with SyncCounter(device) as counter:
            loss = T.forward_backward(model, batch, device, autocast)
            event = T.optimizer_step(model, optimizer, scheduler, hook, step, cfg.training.max_grad_norm)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - tic)
        syncs.append(counter.count)
        if not torch.isfinite(loss):
            raise T.TrainingError(f"loss {loss.item()} at step {step}: "
                                  f"{T.nonfinite_cause(model, precision, scheduler.get_last_lr()[0])}")
        if event is not None:
            ranks = sorted(event["new_ranks"].values())
            note = f" (reallocated at step {step}: ranks {ranks[0]}..{ranks[-1]})"
    T.check_fp32_state(model, optimizer)
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.is_floating_point()]
    row = {"s_step": statistics.median(times[1:] or times),  # the first step pays one-off set-up
           "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
           "syncs": statistics.median(syncs[1:] or syncs) if device.type == "cuda" else None,
           "trainable": dtypes(p for p in model.parameters() if p.requires_grad), "state": dtypes(state),
           "status": "ok" + note + (f" (EVA pass: {init['eva_forward_passes']} forward passes, "
                                    f"{init['eva_init_s']:.1f} s)" if init else "")}
    return row


def main_(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=RUNS, help="run ids (one per method; default: the DeBERTa SST-2 ones)")
    ap.add_argument("--backbone", help="model.backbone (hub id or save_pretrained folder); default: the run config's")
    ap.add_argument("--device", default="auto", help="hardware.device (auto | cpu | cuda | cuda:N)")
    ap.add_argument("--precisions", nargs="+", default=[x for x in T.PRECISIONS if x != "auto"],
                    choices=T.PRECISIONS)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per row (the first is not timed)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    args = ap.parse_args(argv)
    overrides = [*args.set, f"hardware.device={args.device}"] + ([f"model.backbone={args.backbone}"]
                                                                  if args.backbone else [])
    with tempfile.TemporaryDirectory() as results_dir:  # nothing is written there
        cfgs = [run_config(r, overrides, results_dir) for r in args.runs]
    first = cfgs[0]
    device = T.pick_device(first.hardware.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    num_labels = P.task_spec(first.dataset.name)[1].num_labels
    tic = time.perf_counter()
    tokenizer, base = M.load_backbone(first.model.backbone, num_labels, first.model.cache_dir)
    load_s = time.perf_counter() - tic
    stored = str(M.stored_dtype(first.model.backbone, first.model.cache_dir)).removeprefix("torch.")
    env = T.environment(device, 1)
    gpu = f", compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}, " \
          f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB" if device.type == "cuda" else ""
    print(f"backbone {first.model.backbone}: stored {stored}, loaded as {dtypes(base.parameters())} in "
          f"{load_s:.1f} s | device {device} ({env['device_name']}{gpu}) | torch {env['torch']}, transformers "
          f"{env['transformers']}, peft {env['peft']} | batch {first.dataset.batch_size} x {first.dataset.max_length} "
          f"tokens, {args.steps} steps per row")
    header = (f"{'method':<9} {'precision':<9} {'s/step':>8} {'peak MiB':>9} {'syncs/step':>10} {'stored':>8} "
              f"{'trainable':>9} {'opt state':>9}  status")
    print(header)
    print("-" * len(header))
    faults = 0
    for cfg in cfgs:
        if cfg.model.backbone != first.model.backbone or cfg.dataset.name != first.dataset.name:
            raise SystemExit(f"--runs must share one backbone and task ({cfg.run_id} differs from {first.run_id})")
        for precision in args.precisions:
            cfg.hardware.precision = precision
            try:
                row = check_one(cfg, base, device, args.steps, min(tokenizer.vocab_size, base.config.vocab_size),
                                num_labels)
            except T.TrainingError as e:
                row = {"status": f"skipped: {e}"} if "needs a GPU" in str(e) else {"status": f"FAULT: {e}"}
            except Exception as e:  # the first fault of this row, whatever it is; the other rows still run
                message = str(e).strip().splitlines()[0] if str(e).strip() else ""
                row = {"status": f"FAULT: {type(e).__name__}: {message}"}
            faults += row["status"].startswith("FAULT")
            fmt = lambda key, spec: format(row[key], spec) if row.get(key) is not None else "-"  # noqa: E731
            print(f"{cfg.method_name:<9} {precision:<9} {fmt('s_step', '8.4f'):>8} {fmt('peak_mib', '9.0f'):>9} "
                  f"{fmt('syncs', '10.0f'):>10} {stored if 's_step' in row else '-':>8} "
                  f"{row.get('trainable', '-'):>9} {row.get('state', '-'):>9}  {row['status']}", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 1 if faults else 0


if __name__ == "__main__":
    sys.exit(main_())
