"""Host cost of one training step per method, at negligible compute: what a GPU waits on when the host is slower.

A GPU runs a step's kernels only as fast as the host dispatches them. This measures the host's side without a GPU:
a DeBERTa-v3-base-shaped model (12 layers, 72 adapted matrices, relative attention with 256 position buckets, the
DeBERTa configs' adapter settings) at width 32, so the arithmetic is negligible and what remains is dispatch: the
project's own training step (src.train.forward_backward + optimizer_step, the method's hook) on the CPU with one
thread, per method and phase of its schedule. Per step it reports

- host ms: the median wall time of --steps steps (after --warmup unmeasured ones; this machine's load inflates it,
  so run it alone),
- operations: ATen operators dispatched (counted by a TorchDispatchMode, forward, backward and optimizer alike),
  and of those the ones that launch a kernel on a GPU (views and metadata-only operators excluded), and tensors
  made from Python data inside the step (each a host-to-device copy on a GPU),
- host syncs: operators that would make the host wait for a GPU (`.item()`, `nonzero`, `is_nonzero`, ... on a
  tensor that lives on the device in a GPU run; AdamW's step counters stay on the CPU there and are not counted).
  AdamW runs its GPU default (foreach) here, not the CPU's per-tensor loop.

The counts do not depend on the machine's load; they are what a change to the GPU path is measured by here.

    uv run python bench/host_cost.py                 # eager, the shipped path
    uv run python bench/host_cost.py --compile       # also hardware.compile's path (torch.compile of the model)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))

import overhead as O  # noqa: E402  (method configs as the interleaved timer builds them)
from src import model as M  # noqa: E402
from src import train as T  # noqa: E402

SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique", "_unique2",
            "item"}
METADATA_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
                "lift_fresh", "set_", "resize_", "_reshape_alias", "view", "_unsafe_view", "as_strided",
                "unsqueeze", "squeeze", "t", "transpose", "permute", "expand", "slice", "select", "split",
                "split_with_sizes", "unbind", "chunk", "narrow", "diagonal", "unfold", "reshape", "flatten",
                "view_as", "expand_as", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim",
                "is_same_size", "clone_if_view", "_has_compatible_shallow_copy_type", "output_nr", "_version",
                "requires_grad_", "retain_grad"}


class OpCounter(TorchDispatchMode):
    """ATen operators dispatched, those that launch a kernel, host syncs, and CPU->device copies."""

    def __init__(self, device: torch.device, host_resident: set[int] = frozenset()):
        super().__init__()
        self.device, self.ops, self.kernels, self.syncs, self.h2d = device, 0, 0, 0, 0
        self.host_resident = host_resident  # ids of tensors that stay on the CPU in a GPU run (AdamW's step counts)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops += 1
        if name in SYNC_OPS and not (args and id(args[0]) in self.host_resident):
            self.syncs += 1
        if not getattr(func, "is_view", False) and name not in METADATA_OPS:
            self.kernels += 1
        if name == "lift_fresh":  # a tensor made from Python data in the step: a host-to-device copy on a GPU
            self.h2d += 1
        return func(*args, **kwargs)


def backbone(width: int = 32, labels: int = 3):
    """DeBERTa-v3-base's structure (bench/overhead.py's deberta_v3_base) at a width where compute is negligible."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    config = DebertaV2Config(
        vocab_size=1000, hidden_size=width, num_hidden_layers=12, num_attention_heads=2, intermediate_size=2 * width,
        max_position_embeddings=512, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], layer_norm_eps=1e-7, max_relative_positions=-1,
        position_biased_input=False, type_vocab_size=0, pooler_hidden_size=width, pooler_dropout=0.0,
        num_labels=labels)
    return DebertaV2ForSequenceClassification(config)


class Arm:
    """One method in one phase: its own adapter, AdamW, hook, and the run's step numbers it cycles through."""

    def __init__(self, name: str, cfg, base, total: int, first_step: int, device, compile_model: bool):
        self.name, self.first, self.number = name, first_step, first_step - 1
        self.model = M.build_adapter(cfg, copy.deepcopy(base), total).to(device)
        self.model.train()
        t = {"optimizer": "adamw", "learning_rate": 1e-4, "weight_decay": 0.01, "adam_betas": [0.9, 0.999],
             "adam_eps": 1e-8}
        from omegaconf import OmegaConf

        self.optimizer = T.build_optimizer(self.model, OmegaConf.create(t))
        for group in self.optimizer.param_groups:  # a GPU's default AdamW (the CPU's is a per-tensor loop)
            group["foreach"] = True
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        self.hook = M.make_hook(cfg, self.model, self.optimizer)
        self.forward = T.compiled(self.model) if compile_model else self.model

    def step(self, batch, device):
        self.number += 1
        loss = T.forward_backward(self.forward, batch, device, T.nullcontext)
        T.optimizer_step(self.model, self.optimizer, self.scheduler, self.hook, self.number, 1.0)
        return loss


def arms(base, device, compile_model: bool, budget: int = 144) -> list[Arm]:
    """LoRA; GLoRA in its warm-up and after its reallocation; AdaLoRA before, inside and after its budgeting (the
    DeBERTa configs' adapter values: r=8, budget 144 of 576 in rank units, mask every 10 steps)."""
    target = O.TARGETS["deberta-v2"]
    lora = O.method_cfg("lora", target)
    glora_warm = O.method_cfg("glora", target, budget=576, warmup=10**9)
    glora_after = O.method_cfg("glora", target, budget=576, warmup=2)
    ada = O.method_cfg("adalora", target, budget=budget)
    before, final = copy.deepcopy(ada), copy.deepcopy(ada)
    before.adalora.adaptation_start_step = 10**5
    final.adalora.final_steps = 500  # steps 501..1000 of a 1000-step run: the final phase
    out = [Arm("LoRA", lora, base, 10**6, 1, device, compile_model),
           Arm("GLoRA warm-up", glora_warm, base, 10**6, 1, device, compile_model),
           Arm("GLoRA after reallocation", glora_after, base, 10**6, 1, device, compile_model),
           Arm("AdaLoRA before budgeting", before, base, 10**6, 1, device, compile_model),
           Arm("AdaLoRA budgeting", ada, base, 10**6, 1, device, compile_model),
           Arm("AdaLoRA final phase", final, base, 1000, 497, device, compile_model)]
    return out


def batch_of(n: int, length: int, vocab: int = 1000, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, vocab, (n, length), generator=g),
            "attention_mask": torch.ones(n, length, dtype=torch.long),
            "labels": torch.randint(0, 3, (n,), generator=g)}


def measure(arm: Arm, batch, device, steps: int, warmup: int, count: bool) -> dict:
    """Host ms: the median of `steps` timed steps. Operations: counted over 10 further steps (AdaLoRA's budgeting
    masks every 10th, so its mean is the per-step cost); not for a compiled model, whose kernels bypass the
    dispatcher that the counter sits in."""
    for _ in range(warmup):  # GLoRA's reallocation (step 2), AdaLoRA's last budgeting steps and final mask
        arm.step(batch, device).item()
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        arm.step(batch, device).item()
        times.append(time.perf_counter() - tic)
    out = {"host_ms": 1000 * statistics.median(times), "ranks": sum(M.current_ranks(arm.model).values())}
    if not count:
        return out
    steps_on_host = {id(s["step"]) for s in arm.optimizer.state.values() if "step" in s}
    counts = []
    for _ in range(10):
        counter = OpCounter(device, steps_on_host)
        with counter:
            loss = arm.step(batch, device)
        loss.item()
        counts.append((counter.ops, counter.kernels, counter.syncs, counter.h2d))
    mean = [statistics.fmean(c[i] for c in counts) for i in range(4)]
    return {**out, "ops": mean[0], "kernel_ops": mean[1], "syncs": mean[2], "h2d_copies": mean[3]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per arm (their median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4, help="small: the arithmetic must stay negligible")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="also time hardware.compile's path (torch.compile)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    base = backbone()
    batch = batch_of(args.batch_size, args.seq_len)
    variants = [("eager", False)] + ([("compiled", True)] if args.compile else [])
    rows = []
    for label, compile_model in variants:
        for arm in arms(base, device, compile_model):
            rows.append({"path": label, "arm": arm.name,
                         **measure(arm, batch, device, args.steps, args.warmup, count=not compile_model)})
    print(f"host cost per optimizer step: DeBERTa-v3-base structure at width 32, batch {args.batch_size} x "
          f"{args.seq_len} tokens, CPU, 1 thread, torch {torch.__version__}; ops = ATen operators dispatched, "
          f"kernels = of those not views/metadata, syncs = host waits on the device")
    print(f"{'path':<9} {'arm':<26} {'host ms':>8} {'ops':>8} {'kernels':>8} {'syncs':>6} {'new':>5} {'ranks':>6}")
    for r in rows:
        counts = (f"{r['ops']:>8.0f} {r['kernel_ops']:>8.0f} {r['syncs']:>6.1f} {r['h2d_copies']:>5.1f}" if "ops" in r
                  else f"{'-':>8} {'-':>8} {'-':>6} {'-':>5}")
        print(f"{r['path']:<9} {r['arm']:<26} {r['host_ms']:>8.1f} {counts} {r['ranks']:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
