"""Step-time overhead of AdaLoRA and GLoRA against LoRA, and of the project's training step against a bare PEFT loop.

Same process, same architecture and initial weights, same batches; methods are interleaved (A B C ... A B C ...) after
warm-up steps, so machine noise hits all alike. Reports the median and spread of the measured steps.

    uv run python bench/overhead.py                       # DeBERTa-v3-base architecture (random init), CPU
    uv run python bench/overhead.py --device cuda --batch-size 32 --seq-len 256
    uv run python bench/overhead.py --model path/to/save_pretrained_folder

With --task, the timing record that src.evaluate judges H3 from: a (backbone, task)'s own LoRA, AdaLoRA and GLoRA
run configs (--methods prefixes), the task's batches from the run's loader (its files, max_length, batch size, data
order), GLoRA after a real reallocation (--allocation: a trained run's rank_allocation.json / summary.json
final_ranks; else its warm-up on these batches), and every phase of each schedule timed apart: GLoRA's warm-up and
after its reallocation, AdaLoRA before its budgeting (scores), inside it (scores, masking every mask_interval) and
after it (its final phase, re-masking every step). A round is one block of --block steps per phase arm, the arms in
a fresh random order, all on the round's same batches; --pairs measured rounds follow --warmup unmeasured ones. Per
round, a method's step time is its arms' block means weighted by each phase's share of the run's optimizer steps, so
each round gives one log ratio per pair of methods (the units of H3's interval). The record, written atomically, goes
where src.evaluate reads it: `{results_dir}/timing/{backbone}--{task}.json`. A killed record resumes: the pairs so far
are written to `{record}.partial` after every round, and the same command keeps them, warms up again and measures the
rounds left with the arm order and batches an uninterrupted run would have used (the record's `segments` say which
process measured which pairs; a partial file of another design stops it before any step).

    uv run python bench/overhead.py --task SST-2 --allocation results/study/proposed-MiniLM-L6-22M--GLUE-SST-2 \
        --record results/study/timing/MiniLM-L6-22M--SST-2.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import random
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from datasets import DatasetDict
from omegaconf import OmegaConf
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))

import study as S  # noqa: E402  (the run configs as the study composes them)
import src.main  # noqa: E402,F401  (registers the ${package_model:...} resolver the MiniLM configs use)
from src import evaluate as E  # noqa: E402  (the record's path, its per-pair ratios, atomic writes)
from src import model as M  # noqa: E402
from src import preprocess as P  # noqa: E402
from src import train as T  # noqa: E402

CONFIG = OmegaConf.load(REPO / "config" / "config.yaml")
TARGETS = {  # the run configs own the target regexes
    "deberta-v2": CONFIG.model.peft.target_modules,
    "bert": OmegaConf.load(REPO / "config/run/comparative-2-MiniLM-L6-22M--GLUE-SST-2.yaml").model.peft.target_modules,
}


def deberta_v3_base():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=512, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], layer_norm_eps=1e-7, max_relative_positions=-1,
        position_biased_input=False, type_vocab_size=0, pooler_hidden_size=768, pooler_dropout=0.0, num_labels=3)
    return DebertaV2ForSequenceClassification(config)


def method_cfg(kind: str, target_modules: str, init_rank: int = 8, budget: int | None = None, warmup: int = 10**9,
               score: str = "grad_norm"):
    peft = {"type": "adalora" if kind == "adalora" else "lora", "init_rank": init_rank, "lora_alpha": 16,
            "lora_dropout": 0.0, "use_rslora": False, "target_modules": target_modules,
            "modules_to_save": ["classifier", "pooler"]}
    cfg = {"model": {"backbone": "bench", "peft": peft}}
    if kind == "adalora":  # in the budgeting phase the whole time: scores every step, masking every 10
        cfg["adalora"] = {"total_rank_budget": budget, "init_rank": init_rank, "beta1": 0.85, "beta2": 0.85,
                          "orth_reg_weight": 0.1, "adaptation_start_step": 0, "final_steps": 0, "mask_interval": 10}
    if kind == "glora":
        cfg["glo_ra"] = {"total_rank_budget": budget, "budget_unit": "rank", "beta_ema": 0.9, "warmup_steps": warmup,
                         "score": score, "min_rank": 1, "max_rank": None}
    return OmegaConf.create(cfg)


class Runner:
    """One method: its own copy of the model, optimizer, scheduler and hook, and a step function to time."""

    def __init__(self, name, cfg, base, device, bare=False, total_steps=10**6):
        self.name, self.bare = name, bare
        self.model = M.build_adapter(cfg, copy.deepcopy(base), total_steps).to(device)
        self.model.train()
        t = OmegaConf.create({"optimizer": "adamw", "learning_rate": 1e-4, "weight_decay": 0.01,
                              "adam_betas": [0.9, 0.999], "adam_eps": 1e-8})
        self.optimizer = T.build_optimizer(self.model, t)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        self.hook = M.make_hook(cfg, self.model, self.optimizer)
        self.step_no, self.times, self.peak = 0, [], None

    def step(self, batch, device, autocast):
        self.step_no += 1
        if self.bare:  # what a user would write with PEFT alone
            with autocast():
                loss = self.model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            return loss.detach()
        loss = T.forward_backward(self.model, batch, device, autocast)
        T.optimizer_step(self.model, self.optimizer, self.scheduler, self.hook, self.step_no, 1.0)
        return loss


def timed(runner, batch, device, autocast):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    loss = runner.step(batch, device, autocast)
    loss.item()  # same sync point for every method
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        runner.peak = max(runner.peak or 0, torch.cuda.max_memory_allocated(device))
    return time.perf_counter() - tic


# ---------------------------------------------------------------------------------------------------------------
# The timing record (H3): one (backbone, task)'s run configs, every phase of each schedule, interleaved in blocks.

ROLE_OF_KIND = {"lora": "baseline", "adalora": "adalora", "glora": "reference"}  # src.evaluate's role names
NEVER = 10**9  # a GLoRA warm-up that never ends: its arm keeps scoring and never reallocates


def task_configs(args) -> dict[str, object]:
    """role -> the resolved run config of each --methods prefix on the task (--model, --data-dir, --set applied):
    one LoRA, one AdaLoRA, one GLoRA, reading the same data the same way (else the batches could not be shared)."""
    S.check_matrix(args.methods, [args.task], args.backbone)  # a missing config stops here, naming it
    given = [f"model.backbone={args.model}"] * bool(args.model) + [f"dataset.data_dir={args.data_dir}"] * bool(
        args.data_dir)
    cfgs = {}
    for prefix in args.methods:
        cfg = S.run_config(prefix, S.RUN_DIR, f"{args.backbone}--GLUE-{args.task}")
        kind = S.adapter_kind(cfg)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o for o in args.set if S.applies(o, kind)] + given))
        OmegaConf.resolve(cfg)
        role = ROLE_OF_KIND.get(M.adapter_kind(cfg))
        if role is None or role in cfgs:
            sys.exit(f"bench/overhead.py: --methods needs one LoRA, one AdaLoRA and one GLoRA config; {cfg.run_id} "
                     f"is {M.adapter_kind(cfg)}")
        cfgs[role] = cfg
    for key in ("dataset", "training.gradient_accumulation_steps", "training.epochs", "training.max_steps",
                "training.max_train_batches", "hardware.precision", "seed"):
        values = {role: OmegaConf.select(c, key) for role, c in cfgs.items()}
        if len({str(v) for v in values.values()}) > 1:
            sys.exit(f"bench/overhead.py: the configs differ in {key} ({values}): the methods must read the same "
                     f"batches for the same number of steps")
    if cfgs["baseline"].training.gradient_accumulation_steps != 1:
        sys.exit("bench/overhead.py: training.gradient_accumulation_steps must be 1 (a timed step is one batch)")
    return cfgs


def batch_pool(cfg, n: int, device) -> tuple[list[dict], dict, tuple[int, int], object]:
    """The run's first n batches (its loader and epoch seeds, cycling epochs), what they come from, the run's
    optimizer steps (total, per epoch) and the backbone."""
    d = cfg.dataset
    task, spec = P.task_spec(d.name)
    data = P.load_glue(task, d.data_dir, d.cache_dir)
    train = P.subsample(data["train"], d.max_train_samples)
    tokenizer, base = M.load_backbone(cfg.model.backbone, spec.num_labels, cfg.model.cache_dir)
    tokens = P.tokenize(DatasetDict({"train": train}), tokenizer, d.max_length)
    loader, _ = P.make_loaders(tokens, tokenizer, d.batch_size, d.eval_batch_size, cfg.seed)
    t = cfg.training
    per_epoch = T.batches_per_epoch(len(loader), t)
    total = per_epoch * t.epochs if t.max_steps is None else min(per_epoch * t.epochs, t.max_steps)
    batches, epoch = [], 0
    while len(batches) < n:
        loader.generator.manual_seed(T.epoch_seed(cfg.seed, epoch))
        batches += [{k: v.to(device) for k, v in b.items() if k != "idx"} for b, _ in zip(loader, range(per_epoch))]
        epoch += 1
    batches = batches[:n]
    source = {"dataset": d.name, "data_dir": d.data_dir,
              "files": [str(Path(d.data_dir) / spec.folder / "train.tsv")] if d.data_dir else
              [f"hub nyu-mll/glue/{spec.hub_config} (train)"],
              "max_length": d.max_length, "batch_size": d.batch_size, "max_train_samples": d.max_train_samples,
              "train_examples": len(train), "seed": cfg.seed, "n_batches": n,
              "order": "the run's own loader and epoch seeds: its first batches, in its order",
              "padded_tokens": [int(b["input_ids"].numel()) for b in batches]}
    return batches, source, (total, per_epoch), base


def schedule(cfgs: dict, total: int) -> dict:
    """Each method's phases in the run's optimizer steps (1-based), from its resolved schedule."""
    a = cfgs["adalora"].adalora
    return {"total_steps": total, "glora_warmup_steps": int(cfgs["reference"].glo_ra.warmup_steps),
            "adalora": {"adaptation_start_step": int(a.adaptation_start_step), "final_steps": int(a.final_steps),
                        "mask_interval": int(a.mask_interval)}}


class Arm:
    """One method in one phase of its schedule: its own model, the run's optimizer and hook, and the run's optimizer
    step numbers it cycles through (AdaLoRA's hook acts by step number), so every timed step is one of that phase."""

    def __init__(self, name, role, phase, cfg, base, total, device, steps: tuple[int, int], share: float):
        self.name, self.role, self.phase, self.steps, self.share = name, role, phase, steps, share
        self.run_id = cfg.run_id
        self.model = M.build_adapter(cfg, copy.deepcopy(base), total).to(device)
        self.model.train()
        self.optimizer = T.build_optimizer(self.model, cfg.training)
        # the learning rate's schedule changes no step's cost: constant
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        self.hook = M.make_hook(cfg, self.model, self.optimizer)
        self.max_grad_norm, self.done, self.peak = cfg.training.max_grad_norm, 0, None

    def step(self, batch, device, autocast, number: int | None = None):
        first, last = self.steps
        number = number or first + self.done % (last - first + 1)
        loss = T.forward_backward(self.model, batch, device, autocast)
        T.optimizer_step(self.model, self.optimizer, self.scheduler, self.hook, number, self.max_grad_norm)
        self.done += 1
        return loss

    def describe(self) -> dict:
        counts = M.parameter_counts(self.model)
        return {"name": self.name, "role": self.role, "run_id": self.run_id, "phase": self.phase,
                "steps": list(self.steps), "share": self.share, "trainable_params": counts["trainable_params"],
                "rank_total": sum(M.current_ranks(self.model).values())}


def read_allocation(path: str) -> tuple[dict[str, int], str]:
    """GLoRA's ranks from a run folder, its rank_allocation.json (new_ranks) or summary.json (final_ranks)."""
    p = Path(path)
    for candidate in ([p / "rank_allocation.json", p / "summary.json"] if p.is_dir() else [p]):
        if candidate.exists():
            doc = json.loads(candidate.read_text())
            ranks = doc.get("new_ranks") or doc.get("final_ranks")
            if ranks:
                return {k: int(v) for k, v in ranks.items()}, str(candidate)
    sys.exit(f"bench/overhead.py: --allocation {path}: no rank_allocation.json (new_ranks) or summary.json "
             f"(final_ranks) there")


def glora_after(cfg, base, total, device, autocast, batches, sched, args) -> tuple[Arm, dict]:
    """GLoRA after a real reallocation: a trained run's ranks (rebuilt as a resumed run rebuilds them, after a few
    steps so that AdamW has moments to carry), or its own warm-up on the task's batches."""
    warm = sched["glora_warmup_steps"]
    steps = (min(warm + 1, sched["total_steps"]), sched["total_steps"])
    share = (sched["total_steps"] - warm) / sched["total_steps"]
    if args.allocation:
        ranks, source = read_allocation(args.allocation)
        arm = Arm("GLoRA after reallocation", "reference", "after reallocation", _glora(cfg, NEVER), base, total,
                  device, steps, share)
        if set(ranks) != set(arm.hook.names):
            sys.exit(f"bench/overhead.py: {source} names other matrices than {cfg.run_id} adapts "
                     f"(e.g. {sorted(set(ranks) ^ set(arm.hook.names))[0]})")
        for i in range(2):
            arm.step(batches[i % len(batches)], device, autocast, number=i + 1)
        tic = time.perf_counter()
        arm.hook.load_state_dict({"ema": arm.hook.ema}, {"n_updates": arm.hook.n_updates, "event": {
            "step": 2, "new_ranks": ranks, "realloc_seconds": None}})
        seconds, how = time.perf_counter() - tic, f"{source} (a trained run's ranks), rebuilt after 2 steps"
    else:
        n = args.allocation_warmup or warm
        arm = Arm("GLoRA after reallocation", "reference", "after reallocation", _glora(cfg, n), base, total, device,
                  steps, share)
        for i in range(n):
            arm.step(batches[i % len(batches)], device, autocast, number=i + 1)
        assert arm.hook.event is not None  # the hook reallocated at step n
        ranks, seconds = arm.hook.event["new_ranks"], arm.hook.event["realloc_seconds"]
        how = f"warm-up: {n} steps on the task's first batches (glo_ra.score={cfg.glo_ra.score}), then the hook's " \
              f"own reallocation"
    return arm, {"source": how, "ranks": ranks, "rank_total": sum(ranks.values()), "realloc_seconds": seconds,
                 "trainable_params": M.parameter_counts(arm.model)["trainable_params"]}


def _glora(cfg, warmup_steps: int):
    out = copy.deepcopy(cfg)
    out.glo_ra.warmup_steps = warmup_steps
    return out


def build_arms(cfgs, base, total, device, autocast, batches, sched, args) -> tuple[list[Arm], dict]:
    """Every timed phase: LoRA; GLoRA warm-up and after its reallocation; AdaLoRA before, inside and after its
    budgeting phase (a phase of 0 steps is left out), each with its share of the run's optimizer steps."""
    n, a = sched["total_steps"], sched["adalora"]
    tinit, tfinal, warm = a["adaptation_start_step"], a["final_steps"], sched["glora_warmup_steps"]
    after, allocation = glora_after(cfgs["reference"], base, total, device, autocast, batches, sched, args)
    arms = [Arm("LoRA", "baseline", "every step", cfgs["baseline"], base, total, device, (1, n), 1.0),
            Arm("GLoRA warm-up", "reference", "warm-up (scores every step)", _glora(cfgs["reference"], NEVER), base,
                total, device, (1, max(1, warm)), warm / n), after]
    phases = [("AdaLoRA initial", "before budgeting (scores every step, no masking)", (1, tinit), tinit),
              ("AdaLoRA budgeting", "budgeting (scores every step, masks every mask_interval)",
               (tinit + 1, n - tfinal - 1), n - tfinal - tinit),  # step n - tfinal, its one-off final mask, counted here
              ("AdaLoRA final", "final (re-masks every step from its rank pattern)", (n - tfinal + 1, n), tfinal)]
    for name, phase, steps, count in phases:
        if count and steps[1] < steps[0]:
            sys.exit(f"bench/overhead.py: AdaLoRA's {phase} has no step to time (steps {steps})")
        if count:
            arms.append(Arm(name, "adalora", phase, cfgs["adalora"], base, total, device, steps, count / n))
    final = next((x for x in arms if x.name == "AdaLoRA final"), None)
    if final is not None:  # into its final phase as the run gets there: scores, then the final mask at n - tfinal
        for number in range(max(1, n - tfinal - 2), n - tfinal + 1):
            final.step(batches[number % len(batches)], device, autocast, number=number)
    return [x for x in arms if x.share > 0], allocation


def measure(arms: list[Arm], batches, rounds: int, warmup: int, block: int, device, autocast, seed: int,
            done: list | None = None, on_pair=None) -> list:
    """`warmup` unmeasured rounds, then `rounds` measured ones: each arm's block of `block` steps on the round's
    batches, the arms in a fresh random order; garbage is collected between blocks, never inside one. `done`: the
    pairs a killed process measured, kept: this process warms up again, then measures the rounds after them with the
    order and batches an uninterrupted one would have used. `on_pair(pairs)` after each measured round."""
    rng, pairs = random.Random(seed), list(done or [])
    kept = len(pairs)
    # the bar moves between rounds, outside every timed block
    for r in tqdm(range(warmup + rounds), desc=f"timing ({warmup} unmeasured rounds, then {rounds} pairs)",
                  unit="round", file=sys.stderr):
        ids = [(r * block + j) % len(batches) for j in range(block)]
        order = rng.sample(arms, len(arms))  # drawn for every round, kept or not, so the sequence is the same
        if warmup <= r < warmup + kept:
            continue
        times = {}
        for arm in order:
            gc.collect()
            gc.disable()
            times[arm.name] = [timed(arm, batches[i], device, autocast) for i in ids]
            gc.enable()
        if r >= warmup:
            pairs.append({"index": r - warmup, "order": [x.name for x in order], "batches": ids, "step_s": times})
            if on_pair:
                on_pair(pairs)
    return pairs


def ratio_summary(record: dict, confidence: float = 0.95) -> dict:
    """The record's per-pair log ratios and their t-intervals, exponentiated (src.evaluate's own functions)."""
    out = {}
    for label, roles in (("GLoRA/LoRA", ("reference", "baseline")), ("GLoRA/AdaLoRA", ("reference", "adalora")),
                         ("AdaLoRA/LoRA", ("adalora", "baseline"))):
        a, b = (E.role_step_times(record, r) for r in roles)
        iv = E.log_ratio_interval(a, b, confidence)
        out[label] = {"log_ratios": [math.log(x / y) for x, y in zip(a, b)], "estimate": iv["estimate"],
                      "ci": iv["ci"], "confidence": confidence, "n": iv["n"]}
    return out


def record_main(args, argv: list[str]) -> int:
    """Build every arm, interleave them, print the table, write the record (atomically) when --record is given."""
    started, date = time.perf_counter(), T.utc_now()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfgs = task_configs(args)
    device = torch.device(args.device)
    precision = T.check_precision(cfgs["baseline"].hardware.precision, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    probe = cfgs["baseline"]
    batches, source, (total, per_epoch), base = batch_pool(probe, (args.warmup + args.pairs) * args.block, device)
    # every schedule key in optimizer steps, as training resolves them; a schedule that cannot run stops here
    cfgs = {role: T.resolve_schedules(c, total, per_epoch)[0] for role, c in cfgs.items()}
    for c in cfgs.values():
        M.check_budget(c, base, total)
    sched = schedule(cfgs, total)
    arms, allocation = build_arms(cfgs, base, total, device, autocast, batches, sched, args)
    env = T.environment(device, 1, precision)
    # a killed record goes on from its partial file (written after every pair) when the design is the same
    partial = Path(f"{args.record}.partial") if args.record else None
    key = {"task": args.task, "backbone": args.backbone, "run_ids": {role: c.run_id for role, c in cfgs.items()},
           "arms": [a.name for a in arms], "allocation": allocation.get("ranks"), "pairs": args.pairs,
           "block_steps": args.block, "warmup_rounds": args.warmup, "seed": args.seed, "threads": env["cpu_threads"]}
    earlier = resumed_pairs(partial, key)
    segment = {"date": date, "from_pair": len(earlier["pairs"]), "device_name": env["device_name"],
               "measure_wall_s": 0.0, "cpu_time_s": 0.0}
    segments = earlier["segments"] + [segment]
    wall0, cpu0 = time.perf_counter(), time.process_time()

    def save(pairs: list) -> None:
        segment.update(measure_wall_s=time.perf_counter() - wall0, cpu_time_s=time.process_time() - cpu0)
        if partial:
            E.write_json(partial, {"format": PARTIAL_FORMAT, "key": key, "segments": segments, "pairs": pairs})

    pairs = measure(arms, batches, args.pairs, args.warmup, args.block, device, autocast, args.seed,
                    earlier["pairs"], save)
    save(pairs)
    wall, cpu = sum(x["measure_wall_s"] for x in segments), sum(x["cpu_time_s"] for x in segments)
    task, _ = P.task_spec(probe.dataset.name)
    record = {"format": E.TIMING_FORMAT, "task": task, "task_folder": args.task, "backbone": str(probe.model.backbone),
              "backbone_label": args.backbone, "run_ids": {role: c.run_id for role, c in cfgs.items()},
              "method_names": {role: c.method_name for role, c in cfgs.items()},
              "design": {"pairs": args.pairs, "block_steps": args.block, "warmup_rounds": args.warmup,
                         "seed": args.seed, "unit": "a round (pair): one block of block_steps steps per arm on the "
                                                    "round's same batches, the arms in a fresh random order",
                         "method_time": "per pair: sum over a method's arms of share x (block time / block_steps)"},
              "schedule": sched, "arms": [a.describe() for a in arms],
              "adalora_phases_timed": [a.phase for a in arms if a.role == "adalora"], "allocation": allocation,
              "batches": source, "environment": env, "command": "python bench/overhead.py " + shlex.join(argv),
              "date": segments[0]["date"], "segments": segments, "measure_wall_s": wall, "cpu_time_s": cpu,
              "cpu_utilisation": cpu / (wall * env["cpu_threads"]) if env["device"] == "cpu" else None,
              "pairs": pairs}
    record["summary"] = ratio_summary(record)
    record["wall_s"] = time.perf_counter() - started
    print_record(record)
    if args.record:
        E.write_json(Path(args.record), record)
        partial.unlink(missing_ok=True)
        print(f"record: {args.record}")
    return 0


PARTIAL_FORMAT = "glora-interleaved-timing-partial/1"


def resumed_pairs(partial: Path | None, key: dict) -> dict:
    """The pairs and segments a killed run of the same design left in its partial file ({"pairs": [], "segments":
    []} when there is none); a partial file of another design stops here, before any step."""
    if partial is None or not partial.exists():
        return {"pairs": [], "segments": []}
    try:
        state = json.loads(partial.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"bench/overhead.py: {partial}: unreadable ({e}); delete it to start the record afresh")
    if state.get("format") != PARTIAL_FORMAT or state.get("key") != key:
        differ = sorted(k for k in key if (state.get("key") or {}).get(k) != key[k])
        sys.exit(f"bench/overhead.py: {partial} holds pairs of another design (differs in "
                 f"{', '.join(differ) or 'format'}); delete it to start the record afresh")
    print(f"resuming: {len(state['pairs'])} of {key['pairs']} pairs measured by an earlier process ({partial})",
          flush=True)
    return {"pairs": state["pairs"], "segments": state["segments"]}


def print_record(record: dict) -> None:
    env, b = record["environment"], record["batches"]
    print(f"{record['task_folder']} on {record['backbone_label']}: {record['design']['pairs']} pairs x "
          f"{record['design']['block_steps']} steps per arm, batch {b['batch_size']} x max_length {b['max_length']}, "
          f"{env['device_name']}, {env['cpu_threads']} threads, torch {env['torch']}; CPU use "
          f"{record['cpu_utilisation'] or float('nan'):.2f}")
    print(f"{'arm':<26} {'share':>6} {'s/step (median block)':>22} {'trainable':>10} {'ranks':>6}")
    for arm in record["arms"]:
        blocks = [statistics.mean(p["step_s"][arm["name"]]) for p in record["pairs"]]
        print(f"{arm['name']:<26} {arm['share']:>6.3f} {statistics.median(blocks):>22.4f} "
              f"{arm['trainable_params']:>10,} {arm['rank_total']:>6}")
    print(f"GLoRA's allocation: {record['allocation']['source']}")
    for label, s in record["summary"].items():
        ci = "-" if not s["ci"] else f"[{s['ci'][0]:.4f}, {s['ci'][1]:.4f}]"
        print(f"{label} step-time ratio: {s['estimate']:.4f}, {100 * s['confidence']:.0f}% CI {ci} (n = {s['n']} "
              f"pairs)")
    print(f"timing wall time: {record['wall_s']:.0f} s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="save_pretrained folder (default: DeBERTa-v3-base architecture, random init)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="measured steps per method")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps per method first (with --task: unmeasured rounds)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (adapters stay fp32)")
    ap.add_argument("--seed", type=int, default=0)
    rec = ap.add_argument_group("timing record (H3): --task selects it; --steps/--batch-size/--seq-len do not apply")
    rec.add_argument("--task", help="GLUE folder name (SST-2, CoLA, ...): time this task's run configs")
    rec.add_argument("--backbone", default="MiniLM-L6-22M", help="run configs {prefix}-{backbone}--GLUE-{task}")
    rec.add_argument("--methods", nargs=3, default=["comparative-2", "comparative-1", "proposed"], metavar="PREFIX",
                     help="run-id prefixes of one LoRA, one AdaLoRA and one GLoRA config (e.g. comparative-2-long "
                          "comparative-1-long proposed-long)")
    rec.add_argument("--data-dir", help="GLUE folder (default: the configs')")
    rec.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                     help="overrides for every config (adalora.* / glo_ra.* reach only that method's, as in the study)")
    rec.add_argument("--allocation", help="GLoRA's ranks: a run folder, its rank_allocation.json (new_ranks) or "
                                          "summary.json (final_ranks); default: its warm-up on the task's batches")
    rec.add_argument("--allocation-warmup", type=int, help="warm-up steps for that allocation (default: the "
                                                           "config's glo_ra.warmup_steps)")
    rec.add_argument("--pairs", type=int, default=40, help="measured rounds (block pairs)")
    rec.add_argument("--block", type=int, default=10, help="steps per arm per round (AdaLoRA's mask_interval: one "
                                                           "masking step per budgeting block)")
    rec.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    rec.add_argument("--record", help="write the record here (src.evaluate reads "
                                      "{results_dir}/timing/{backbone}--{task}.json)")
    args = ap.parse_args(argv)
    if args.task:
        return record_main(args, sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    # the run's own precision check: bf16 only where the device has it natively (an error otherwise)
    T.check_precision("bf16" if args.bf16 else "fp32", device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext
    if args.model:
        from transformers import AutoModelForSequenceClassification

        # float32 whatever the folder stores, as training loads it (a float16 folder would otherwise train in fp16)
        base = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=3, dtype=torch.float32,
                                                                  ignore_mismatched_sizes=True)
    else:
        base = deberta_v3_base()
    targets = TARGETS[base.config.model_type]
    n = len(M.target_module_names(base, targets))
    uniform = 8 * n

    g = torch.Generator().manual_seed(args.seed)
    vocab = base.config.vocab_size
    batches = [{"input_ids": torch.randint(5, vocab, (args.batch_size, args.seq_len), generator=g),
                "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long),
                "labels": torch.randint(0, 3, (args.batch_size,), generator=g)} for _ in range(4)]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]

    # GLoRA after reallocation: warm up its scores on these batches, then rebuild to its real heterogeneous ranks
    glora_after = Runner("GLoRA after realloc", method_cfg("glora", targets, budget=uniform, warmup=args.warmup + 1),
                         base, device)
    for i in range(args.warmup + 1):
        glora_after.step(batches[i % len(batches)], device, autocast)
    realloc_seconds = glora_after.hook.event["realloc_seconds"]
    ranks = sorted(glora_after.hook.event["new_ranks"].values())

    runners = [
        Runner("LoRA r=8", method_cfg("lora", targets), base, device),
        Runner("AdaLoRA init 12 -> avg 8", method_cfg("adalora", targets, init_rank=12, budget=uniform), base, device),
        Runner(f"AdaLoRA init 8 -> {min(128, uniform - 1)}",
               method_cfg("adalora", targets, init_rank=8, budget=min(128, uniform - 1)), base, device),
        Runner("GLoRA warm-up (scoring)", method_cfg("glora", targets, budget=uniform), base, device),
        Runner("GLoRA warm-up (delta_grad)", method_cfg("glora", targets, budget=uniform, score="delta_grad"), base,
               device),
        glora_after,
        Runner("bare PEFT loop (LoRA r=8)", method_cfg("lora", targets), base, device, bare=True),
    ]
    for i in range(args.warmup):
        for r in runners:
            r.step(batches[i % len(batches)], device, autocast)
    for i in range(args.steps):
        for r in runners:
            r.times.append(timed(r, batches[i % len(batches)], device, autocast))

    med = {r.name: statistics.median(r.times) for r in runners}
    lora = med["LoRA r=8"]
    print(f"device={device} batch={args.batch_size} seq_len={args.seq_len} measured_steps={args.steps} "
          f"warmup_steps={args.warmup} adapted_matrices={n} torch={torch.__version__} threads={torch.get_num_threads()}")
    header = f"{'method':<30} {'s/step (median)':>16} {'IQR':>9} {'ratio to LoRA':>14} {'peak mem MiB':>13} " \
             f"{'trainable params':>17} {'rank budget':>12}"
    print(header)
    print("-" * len(header))
    for r in runners:
        q = statistics.quantiles(r.times, n=4) if len(r.times) >= 2 else [r.times[0]] * 3
        peak = f"{r.peak / 2**20:.0f}" if r.peak else "n/a (cpu)"
        counts = M.parameter_counts(r.model)
        budget = sum(M.current_ranks(r.model).values())
        print(f"{r.name:<30} {med[r.name]:>16.4f} {q[2] - q[0]:>9.4f} {med[r.name] / lora:>14.3f} {peak:>13} "
              f"{counts['trainable_params']:>17,} {budget:>12}")
    print(f"{'GLoRA rebuild pause (once)':<30} {realloc_seconds:>16.4f} {'':>9} {realloc_seconds / lora:>14.3f}"
          f"   (one-off, in LoRA steps)")
    print(f"GLoRA ranks after reallocation: min {ranks[0]}, median {ranks[len(ranks) // 2]}, max {ranks[-1]}")
    print(f"glora/lora step-time ratio: {med['GLoRA after realloc'] / lora:.3f}")
    print(f"glora-warmup/lora step-time ratio: {med['GLoRA warm-up (scoring)'] / lora:.3f}")
    print(f"delta_grad-warmup/lora step-time ratio: {med['GLoRA warm-up (delta_grad)'] / lora:.3f}")
    print(f"adalora/lora step-time ratio: {med['AdaLoRA init 12 -> avg 8'] / lora:.3f}")
    print(f"harness/bare step-time ratio: {lora / med['bare PEFT loop (LoRA r=8)']:.3f}")
    print(f"rebuild pause / LoRA step: {realloc_seconds / lora:.3f}")
    print(f"bench wall time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
