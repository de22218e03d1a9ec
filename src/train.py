"""Training layer: one readable loop for LoRA, AdaLoRA and GLoRA, with the run record written as it goes."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from transformers import get_scheduler, set_seed

from src import model as M
from src import preprocess as P

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message names the step."""


# ---------------------------------------------------------------------------------------------------------------
# The run record: history.jsonl as it goes, summary.json at the end, the same rows to W&B when it is on.

def write_json_atomic(path: Path, obj) -> None:
    """Temp file in the same folder, then rename: a reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if torch.is_tensor(o):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


class Recorder:
    """Appends each row to history.jsonl (flushed, so a killed run keeps its history) and mirrors it to W&B."""

    def __init__(self, run_dir: Path, cfg, run_name: str):
        self.run_dir = run_dir
        self.history = (run_dir / "history.jsonl").open("a", encoding="utf-8")
        self.wandb = None
        if cfg.wandb.mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb.project, entity=cfg.wandb.entity, id=run_name, name=run_name, group=cfg.run_id,
                job_type="train", mode=cfg.wandb.mode, resume="allow", dir=str(run_dir),
                config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, row: dict) -> None:
        self.history.write(json.dumps(row, default=_json_default) + "\n")
        self.history.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k not in ("step", "event")}, step=row["step"])

    def finish(self, summary: dict) -> None:
        write_json_atomic(self.run_dir / "summary.json", summary)
        if self.wandb is not None:
            self.wandb.summary.update(summary)
            self.wandb.finish()
        self.history.close()

    def abort(self) -> None:
        if self.wandb is not None:
            self.wandb.finish(exit_code=1)
        self.history.close()


# ---------------------------------------------------------------------------------------------------------------
# Set-up helpers.

def open_run_dir(cfg, run_dir: Path, can_resume: bool = True) -> bool:
    """Create the run folder and write the resolved config; returns True when the run continues from a checkpoint.

    With `resume=true`, an unfinished run with a checkpoint is continued (after checking that its config is this
    one). Otherwise a folder left by an earlier run is moved aside, never deleted; its Optuna study (optuna/) comes
    back into the new folder so that a search resumes."""
    ckpt = run_dir / "checkpoint"
    if (can_resume and cfg.resume and ckpt.is_dir() and any(ckpt.glob("step-*"))
            and not (run_dir / "summary.json").exists()):
        check_same_config(cfg, run_dir / "config.yaml")
        return True
    leftovers = [p for p in run_dir.iterdir() if p.name != "optuna"] if run_dir.exists() else []
    if leftovers:
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(run_dir, aside)
        if (aside / "optuna").exists():
            run_dir.mkdir(parents=True)
            os.replace(aside / "optuna", run_dir / "optuna")
        log.warning("existing run folder moved aside to %s", aside)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / ".config.yaml.tmp"
    OmegaConf.save(cfg, tmp, resolve=True)
    os.replace(tmp, run_dir / "config.yaml")
    return False


RESUME_MAY_DIFFER = ("resume", "wandb.")


def check_same_config(cfg, saved_path: Path) -> None:
    """Refuse to continue a checkpoint written under another config; name the keys that differ."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    saved = flat(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)) if saved_path.exists() else {}
    now = flat(OmegaConf.to_container(cfg, resolve=True))
    diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k) and not k.startswith(RESUME_MAY_DIFFER)]
    if diff:
        raise CheckpointError(f"{saved_path.parent} holds a checkpoint of a different config ({'; '.join(diff[:5])}"
                              f"{' ...' if len(diff) > 5 else ''}); pass resume=false to start over")


def truncate_history(path: Path, step: int) -> None:
    """Drop history rows after the checkpoint's step (the resumed run logs them again), and a half-written line."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and LayerNorm weights."""
    if t.optimizer != "adamw":
        raise ValueError(f"training.optimizer={t.optimizer!r}: only adamw is supported")
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in n or "layer_norm" in n else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=tuple(t.adam_betas), eps=t.adam_eps)


def batches_per_epoch(n_batches: int, t) -> int:
    return n_batches if t.max_train_batches is None else min(n_batches, t.max_train_batches)


@torch.no_grad()
def evaluate_split(model, loader, spec: P.TaskSpec, device, autocast) -> tuple[np.ndarray, np.ndarray, float]:
    """Predictions, labels and mean loss on one eval split."""
    model.eval()
    preds, labels, loss_sum, n = [], [], 0.0, 0
    for batch in tqdm(loader, desc="eval", leave=False, mininterval=2):
        batch = {k: v.to(device) for k, v in batch.items() if k != "idx"}
        with autocast():
            out = model(**batch)
        logits = out.logits.float()
        preds.append(logits.squeeze(-1) if spec.is_regression else logits.argmax(-1))
        labels.append(batch["labels"])
        loss_sum += out.loss.float().item() * len(batch["labels"])
        n += len(batch["labels"])
    model.train()
    return torch.cat(preds).cpu().numpy(), torch.cat(labels).cpu().numpy(), loss_sum / max(n, 1)


def run_evaluation(model, eval_loaders, spec, device, autocast) -> tuple[dict, dict]:
    """`validation_*` metrics of every eval split (MNLI's mismatched split gets the `_mm` suffix) and predictions."""
    metrics, predictions = {}, {}
    for split, loader in eval_loaders.items():
        preds, labels, loss = evaluate_split(model, loader, spec, device, autocast)
        suffix = "_mm" if split == "validation_mm" else ""
        for k, v in {**P.compute_metrics(spec, preds, labels), "loss": loss}.items():
            metrics[f"validation_{k}{suffix}"] = v
        predictions[split] = (loader.dataset["idx"], labels, preds)
    plain = {k.removeprefix("validation_"): v for k, v in metrics.items()}
    if spec.glue_metric != "accuracy_m_mm_mean" or "accuracy_mm" in plain:
        metrics["validation_glue_score"] = P.glue_score(spec, plain)
    return metrics, predictions


def save_predictions(path: Path, predictions: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "idx", "label", "prediction"])
        for split, (idx, labels, preds) in predictions.items():
            for i, y, p in zip(np.asarray(idx).tolist(), labels.tolist(), preds.tolist()):
                w.writerow([split, i, y, p])
    os.replace(tmp, path)


def save_adapter(model, path: Path) -> None:
    """PEFT save_pretrained (safetensors), written beside and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# The run.

def train_run(cfg, run_dir: Path, run_name: str, on_eval=None, extra_summary: dict | None = None) -> dict:
    """Train one run of `cfg` into `run_dir` and return its summary (also written to summary.json).

    `on_eval(metrics, step, adaptation_done)` makes this an Optuna trial: it trains on the training set minus a
    held-out tuning split, evaluates on that split (never on the dev set that the final run reports), and saves no
    adapter or predictions. The callback may raise to prune.
    """
    tuning = on_eval is not None
    t, d = cfg.training, cfg.dataset
    set_seed(cfg.seed)
    if cfg.hardware.deterministic:
        torch.use_deterministic_algorithms(True)
    device = pick_device(cfg.hardware.device)
    bf16 = cfg.hardware.precision == "bf16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    # data first: a bad file fails before the model is loaded
    task, spec = P.task_spec(d.name)
    data = P.load_glue(task, d.data_dir, d.cache_dir)
    data["train"] = P.subsample(data["train"], d.max_train_samples)
    if tuning:
        data = P.tuning_split(data["train"], cfg.optuna.holdout_fraction)
    for split in [s for s in data if s != "train"]:
        data[split] = P.subsample(data[split], d.max_eval_samples)
    tokenizer, base = M.load_backbone(cfg.model.backbone, spec.num_labels, cfg.model.cache_dir)
    data = P.tokenize(data, tokenizer, d.max_length)
    train_loader, eval_loaders = P.make_loaders(data, tokenizer, d.batch_size, d.eval_batch_size, cfg.seed,
                                                d.num_workers)
    n_batches = batches_per_epoch(len(train_loader), t)
    per_epoch = math.ceil(n_batches / t.gradient_accumulation_steps)
    total_steps = per_epoch * t.epochs if t.max_steps is None else min(per_epoch * t.epochs, t.max_steps)
    M.check_budget(cfg, base, total_steps)
    resuming = open_run_dir(cfg, run_dir, can_resume=not tuning)  # only now: bad input leaves results untouched

    if t.gradient_checkpointing:
        base.gradient_checkpointing_enable()
    model = M.build_adapter(cfg, base, total_steps).to(device)
    if t.gradient_checkpointing:
        model.enable_input_require_grads()
    model.train()
    optimizer = build_optimizer(model, t)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                              num_training_steps=total_steps)
    hook = M.make_hook(cfg, model, optimizer)
    counts_initial = M.parameter_counts(model)
    initial_ranks = M.current_ranks(model)
    log.info("%s | %s on %s | %d train examples, %d optimizer steps (%d/epoch), batch %d x accum %d | "
             "trainable params %d, rank budget %d | device %s", run_name, cfg.method_name, task,
             len(data["train"]), total_steps, per_epoch, d.batch_size, t.gradient_accumulation_steps,
             counts_initial["trainable_params"], sum(initial_ranks.values()), device)

    checkpoints = None if tuning else Checkpoints(run_dir / "checkpoint", model, optimizer, scheduler, hook,
                                                   train_loader.generator, t.keep_checkpoints)
    state = None
    if resuming:
        state = checkpoints.restore_latest()
        truncate_history(run_dir / "history.jsonl", state.step)
    recorder = Recorder(run_dir, cfg, run_name)
    try:
        summary = _loop(cfg, model, optimizer, scheduler, hook, train_loader, eval_loaders, spec, device, autocast,
                        n_batches, total_steps, recorder, on_eval, state, checkpoints)
    except BaseException:
        recorder.abort()
        raise
    counts = M.parameter_counts(model)
    final_ranks = M.current_ranks(model)
    summary.update(
        run_id=cfg.run_id, run_name=run_name, method=cfg.method, method_name=cfg.method_name, task=task,
        dataset=d.name, backbone=str(cfg.model.backbone), seed=cfg.seed, status="finished",
        total_steps=total_steps, epochs=t.epochs, **counts, rank_budget_total=sum(final_ranks.values()),
        rank_budget_initial=sum(initial_ranks.values()), final_ranks=final_ranks, **hook.summary(),
        **(extra_summary or {}))
    if hook.summary().get("realloc_step") is not None:
        write_json_atomic(run_dir / "rank_allocation.json", hook.event)
    if not tuning:
        save_adapter(model, run_dir / "adapter")
    recorder.finish(summary)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: resume after a kill, also after GLoRA's reallocation.

class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (unreadable, or from another config)."""


class Checkpoints:
    """{run_dir}/checkpoint/step-NNNNNNN/: trainable weights (safetensors), optimizer and scheduler state dicts
    (torch.save, read back with weights_only=True), AdaLoRA's allocator and GLoRA's score state, RNG states and the
    loop state (data position, elapsed train time). Each is written to a temp folder and renamed, so a kill mid-write
    leaves the previous checkpoint whole; the last `keep` are kept."""

    def __init__(self, root: Path, model, optimizer, scheduler, hook, generator: torch.Generator, keep: int):
        self.root, self.model, self.optimizer, self.scheduler = root, model, optimizer, scheduler
        self.hook, self.generator, self.keep = hook, generator, max(1, keep)
        self._epoch_start_state = None
        self._restore_generator = None

    def epoch_start(self) -> None:
        """Called before each epoch's iteration: on resume, put the loader's generator back where that epoch began."""
        if self._restore_generator is not None:
            self.generator.set_state(self._restore_generator)
            self._restore_generator = None
        self._epoch_start_state = self.generator.get_state()

    def save(self, st: LoopState) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{st.step:07d}"
        tmp = self.root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        from safetensors.torch import save_file

        tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in self.model.named_parameters()
                   if p.requires_grad}
        bad = [n for n, v in tensors.items() if not torch.isfinite(v).all()]
        if bad:  # never replace a good checkpoint with a broken one
            shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingError(f"weights became non-finite at optimizer step {st.step} ({bad[0].removeprefix('param/')}"
                                f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); stopping, the last good "
                                f"checkpoint is kept; try a lower training.learning_rate")
        # mid-epoch: the epoch's start state replays its permutation; at an epoch end: the next epoch's start state
        loader_state = self._epoch_start_state if st.batches_done else self.generator.get_state()
        tensors["rng/torch"] = torch.get_rng_state()
        tensors["rng/loader"] = loader_state
        if torch.cuda.is_available():
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda/{i}"] = state
        tensors.update({f"hook/{k}": v.detach().cpu().contiguous() for k, v in self._hook_tensors().items()})
        save_file(tensors, tmp / "state.safetensors")
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   tmp / "optimizer.pt")
        write_json_atomic(tmp / "state.json", {"loop": asdict(st), "hook": self._hook_json()})
        if final.exists():  # a stale checkpoint of this step (the run resumed from before it): replaced
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(self.root.glob("step-*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _hook_tensors(self) -> dict:
        if isinstance(self.hook, M.GloraHook):
            return {"glora/ema": self.hook.ema}
        if isinstance(self.hook, M.AdaLoraHook):
            ra = self.model.base_model.rankallocator
            return {f"adalora/{kind}/{n}": t for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc")
                    for n, t in getattr(ra, kind).items()}
        return {}

    def _hook_json(self) -> dict:
        if isinstance(self.hook, M.GloraHook):
            return {"n_updates": self.hook.n_updates, "event": self.hook.event}
        if isinstance(self.hook, M.AdaLoraHook):
            return {"rank_pattern": self.model.peft_config[M.ADAPTER].rank_pattern}
        return {}

    def available(self) -> list[Path]:
        return sorted(self.root.glob("step-*"), reverse=True) if self.root.exists() else []

    def restore_latest(self) -> LoopState:
        """Load the newest readable checkpoint; an unreadable one is reported and the previous one used."""
        problems = []
        for path in self.available():
            try:
                parts = self._read(path)
            except Exception as e:  # corrupt or truncated files: fall back to the previous checkpoint
                problems.append(f"{path.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                aside = path.with_name(f"corrupt-{path.name}")  # kept for inspection; out of the step-* rotation
                shutil.rmtree(aside, ignore_errors=True)
                path.rename(aside)
                log.warning("checkpoint %s is unreadable (%s); moved to %s, trying the previous one", path,
                            problems[-1], aside.name)
                continue
            st = self._apply(*parts)
            log.info("resuming from %s (optimizer step %d, epoch %d)", path, st.step, st.epoch)
            return st
        raise CheckpointError(f"no readable checkpoint in {self.root}: {'; '.join(problems) or 'none found'}")

    @staticmethod
    def _read(path: Path):
        from safetensors.torch import load_file

        state = json.loads((path / "state.json").read_text())
        tensors = load_file(path / "state.safetensors")
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        return state, tensors, opt

    def _apply(self, state: dict, tensors: dict, opt: dict) -> LoopState:
        hook_state = state["hook"]
        if isinstance(self.hook, M.GloraHook) and hook_state.get("event"):
            # after the reallocation: the ranks must be rebuilt before the weights fit
            M.rebuild_lora_layers(self.model, hook_state["event"]["new_ranks"], self.optimizer)
            self.hook.event = hook_state["event"]
            self.hook._tensors = []
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        saved = {k.removeprefix("param/"): v for k, v in tensors.items() if k.startswith("param/")}
        if set(saved) != set(params) or any(saved[n].shape != params[n].shape for n in params):
            raise CheckpointError("checkpoint weights do not match this model (different config or code)")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n].to(p.device))
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        if isinstance(self.hook, M.GloraHook):
            self.hook.ema = tensors["hook/glora/ema"].to(self.hook.ema.device)
            self.hook.n_updates = hook_state["n_updates"]
        if isinstance(self.hook, M.AdaLoraHook):
            ra = self.model.base_model.rankallocator
            for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                prefix = f"hook/adalora/{kind}/"
                setattr(ra, kind, {k.removeprefix(prefix): v.to(params[next(iter(params))].device)
                                   for k, v in tensors.items() if k.startswith(prefix)})
            self.model.peft_config[M.ADAPTER].rank_pattern = hook_state["rank_pattern"]
        torch.set_rng_state(tensors["rng/torch"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")])
        self._restore_generator = tensors["rng/loader"]
        st = LoopState(**state["loop"])
        st.resumes += 1
        return st


def forward_backward(model, batch: dict, device, autocast, accum: int = 1) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its loss (detached, on the device: no host sync).
    The backward pass sees loss / accum, so accumulated gradients are those of the mean loss."""
    batch = {k: v.to(device) for k, v in batch.items() if k != "idx"}
    with autocast():
        loss = model(**batch).loss  # AdaLoRA adds its orthogonal regulariser here (labels are passed)
    (loss / accum).backward()
    return loss.detach().float()


def optimizer_step(model, optimizer, scheduler, hook, step: int, max_grad_norm: float) -> dict | None:
    """One optimizer step in the order the adapters need: GLoRA's score hook on the unclipped gradients, clip, step,
    schedule, then the adapter hook (AdaLoRA's update_and_allocate, GLoRA's reallocation read p.grad), zero_grad."""
    hook.on_gradients(step)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    event = hook.on_optimizer_step(step)
    optimizer.zero_grad(set_to_none=True)
    return event


@dataclass
class LoopState:
    """Everything the loop needs to continue exactly where a checkpoint left it."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0          # micro-batches consumed in the current epoch
    train_time: float = 0.0
    eval_time: float = 0.0
    running_loss: float = 0.0
    running_n: int = 0
    best_value: float = -math.inf
    best_step: int | None = None
    best_metrics: dict = field(default_factory=dict)
    last_metrics: dict = field(default_factory=dict)
    resumes: int = 0


def _loop(cfg, model, optimizer, scheduler, hook, train_loader, eval_loaders, spec, device, autocast, n_batches,
          total_steps, recorder, on_eval=None, state: LoopState | None = None, checkpoints=None) -> dict:
    """The training loop; returns the metric part of the summary."""
    t = cfg.training
    accum = t.gradient_accumulation_steps
    per_epoch = math.ceil(n_batches / accum)
    primary = f"validation_{P.primary_metric(spec)}"
    st = state or LoopState()
    last_predictions = {}
    running_loss = torch.tensor(st.running_loss, device=device)
    pbar = tqdm(total=total_steps, initial=st.step, desc="train", mininterval=1)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def evaluate():
        nonlocal last_predictions
        tic = time.perf_counter()
        st.last_metrics, last_predictions = run_evaluation(model, eval_loaders, spec, device, autocast)
        st.eval_time += time.perf_counter() - tic
        recorder.log({"step": st.step, "epoch": st.step / per_epoch, **st.last_metrics})
        if st.last_metrics[primary] > st.best_value:
            st.best_value, st.best_step, st.best_metrics = st.last_metrics[primary], st.step, dict(st.last_metrics)
        if on_eval is not None:
            on_eval(st.last_metrics, st.step, hook.adaptation_done(st.step))

    sync()
    tic = time.perf_counter()
    while st.epoch < t.epochs and st.step < total_steps:
        # the loader's permutation for this epoch is drawn from its generator when iteration starts
        if checkpoints:
            checkpoints.epoch_start()
        for i, batch in enumerate(train_loader):
            if i < st.batches_done:  # resuming mid-epoch: these batches were trained on before the kill
                continue
            if i >= n_batches or st.step >= total_steps:
                break
            running_loss += forward_backward(model, batch, device, autocast, accum)
            st.running_n += 1
            st.batches_done = i + 1
            if (i + 1) % accum and i + 1 != n_batches:
                continue
            st.step += 1
            event = optimizer_step(model, optimizer, scheduler, hook, st.step, t.max_grad_norm)
            pbar.update(1)
            if event is not None:
                recorder.log({"step": st.step, "event": "glora_reallocation",
                              **{k: event[k] for k in ("realloc_seconds", "trainable_params_before",
                                                       "trainable_params_after", "scores", "old_ranks",
                                                       "new_ranks")}})
            if st.step % t.log_every_steps == 0 or st.step == total_steps:
                mean_loss = (running_loss / st.running_n).item()
                if not math.isfinite(mean_loss):
                    raise TrainingError(f"training loss became {mean_loss} at optimizer step {st.step}; stopping "
                                        f"(the last good checkpoint is kept; try a lower training.learning_rate)")
                recorder.log({"step": st.step, "epoch": st.step / per_epoch, "train_loss": mean_loss,
                              "lr": scheduler.get_last_lr()[0]})
                pbar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                running_loss.zero_()
                st.running_n = 0
            end_of_epoch = st.step % per_epoch == 0 or st.step == total_steps
            do_eval = end_of_epoch or (t.eval_every_steps and st.step % t.eval_every_steps == 0)
            do_checkpoint = checkpoints and (end_of_epoch or (t.checkpoint_every_steps and
                                                              st.step % t.checkpoint_every_steps == 0))
            if do_eval or do_checkpoint:
                sync()
                st.train_time += time.perf_counter() - tic
                if do_eval:
                    evaluate()
                if do_checkpoint:
                    st.running_loss = running_loss.item()
                    if end_of_epoch:  # the next checkpoint's data position starts a new epoch
                        st.epoch, st.batches_done = st.epoch + 1, 0
                    checkpoints.save(st)
                sync()
                tic = time.perf_counter()
        if st.batches_done:  # the epoch ran out of batches without a checkpoint at its end
            st.epoch, st.batches_done = st.epoch + 1, 0
    sync()
    st.train_time += time.perf_counter() - tic
    pbar.close()
    if not last_predictions and st.last_metrics:  # resumed after the final evaluation: redo it, unlogged
        st.last_metrics, last_predictions = run_evaluation(model, eval_loaders, spec, device, autocast)

    out = {k.removeprefix("validation_"): v for k, v in st.last_metrics.items()}
    out["glue_metric"] = spec.glue_metric
    out["glue_score"] = st.last_metrics.get("validation_glue_score")
    out["best_step"] = st.best_step
    out.update({f"best_{k}": v for k, v in st.best_metrics.items()})
    out.update(train_time_s=st.train_time, eval_time_s=st.eval_time, final_step=st.step, resumes=st.resumes)
    if cfg.evaluation.save_predictions and on_eval is None:
        save_predictions(recorder.run_dir / "predictions.csv", last_predictions)
    return out
