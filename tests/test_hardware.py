"""The real run on real hardware: a backbone stored in float16 trains in float32, the start-up and NaN checks name
their cause, one rule places a run on a GPU (sweeps wrap around the GPUs), data-parallel processes draw their own
CUDA streams and resume from their own RNG states, and the step needs no host sync on a GPU. GPU paths run here on
the CPU with torch.cuda's functions patched, exactly as a GPU node calls them."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import src.main as main
from src import model as M
from src import preprocess as P
from src import train as T
from tests.test_config import compose_run

RUNS = {"LoRA": ("comparative-2-DeBERTa-v3-base-86M--GLUE-SST-2", []),
        "AdaLoRA": ("comparative-1-DeBERTa-v3-base-86M--GLUE-SST-2", ["adalora.total_rank_budget=40"]),
        "GLoRA": ("proposed-DeBERTa-v3-base-86M--GLUE-SST-2", ["glo_ra.total_rank_budget=60"])}


pytestmark = pytest.mark.usefixtures("one_thread_no_bars")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_fp16(tiny_model, tmp_path_factory) -> Path:
    """The tiny DeBERTa saved in float16, as microsoft/deberta-v3-base is distributed."""
    from transformers import AutoModelForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-fp16")
    AutoModelForSequenceClassification.from_pretrained(tiny_model, dtype=torch.float32).half().save_pretrained(folder)
    for f in tiny_model.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, folder / f.name)
    return folder


def full_cfg(method, backbone, glue_dir, results, *extra):
    run_id, overrides = RUNS[method]
    return compose_run(run_id, "mode=full", "wandb.mode=disabled", "optuna.n_trials=0", "training.max_steps=20",
                       "training.log_every_steps=1", f"model.backbone={backbone}", f"dataset.data_dir={glue_dir}",
                       f"results_dir={results}", *overrides, *extra)


def _lora(tiny_model):
    cfg = compose_run(RUNS["LoRA"][0], "mode=trial", f"model.backbone={tiny_model}")
    _, base = M.load_backbone(str(tiny_model), 2, "unused")
    return M.build_adapter(cfg, base, 10)


# ---------------------------------------------------------------------------------------------------------------
# Precision.

@pytest.mark.parametrize("method", sorted(RUNS))
def test_a_float16_saved_backbone_trains_in_full_mode_in_float32(method, tiny_fp16, glue_dir, tmp_path):
    """The issue's failure: before, the LoRA config stopped at optimizer step 2 with a NaN loss (the classifier and
    pooler, modules_to_save, were float16, so was their AdamW state)."""
    assert M.stored_dtype(str(tiny_fp16), "unused") == torch.float16
    main.run(full_cfg(method, tiny_fp16, glue_dir, tmp_path))
    run_dir = tmp_path / RUNS[method][0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["backbone_stored_dtype"] == "float16"
    losses = [json.loads(r)["train_loss"] for r in (run_dir / "history.jsonl").read_text().splitlines()
              if "train_loss" in r]
    assert len(losses) == summary["total_steps"] == 9 and all(map(torch.isfinite, torch.tensor(losses)))
    checkpoint = max((run_dir / "checkpoint").glob("step-*"))
    params = {k: v for k, v in load_file(checkpoint / "state.safetensors").items() if k.startswith("param/")}
    assert any("classifier" in k for k in params) and {v.dtype for v in params.values()} == {torch.float32}
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    moments = [v for s in state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert len(moments) == 2 * len(params) and {v.dtype for v in moments} == {torch.float32}
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert {v.dtype for v in adapter.values()} == {torch.float32}


def test_the_start_up_check_names_a_half_precision_parameter_or_state(tiny_model):
    model = _lora(tiny_model)
    optimizer = T.build_optimizer(model, compose_run(RUNS["LoRA"][0], "mode=trial").training)
    T.check_fp32_state(model, optimizer)  # float32: no error
    name, head = next((n, p) for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)
    head.data = head.data.half()
    with pytest.raises(T.TrainingError, match=rf"{name} is torch.float16.*eps.*hardware.precision=bf16"):
        T.check_fp32_state(model, optimizer)
    head.data = head.data.float()
    optimizer.state[head]["exp_avg"] = torch.zeros_like(head, dtype=torch.float16)
    with pytest.raises(T.TrainingError, match=rf"optimizer state 'exp_avg' of {name} is torch.float16"):
        T.check_fp32_state(model, optimizer)


def test_a_run_with_a_half_precision_trainable_parameter_stops_before_its_first_step(tiny_model, glue_dir, tmp_path,
                                                                                    monkeypatch):
    real = M.build_adapter

    def half_head(*args, **kwargs):
        model = real(*args, **kwargs)
        next(p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n).data = \
            torch.zeros(2, 32, dtype=torch.float16)
        return model

    monkeypatch.setattr(M, "build_adapter", half_head)
    with pytest.raises(T.TrainingError, match="must be float32, but .*classifier.* is torch.float16"):
        main.run(full_cfg("LoRA", tiny_model, glue_dir, tmp_path))
    assert not (tmp_path / RUNS["LoRA"][0] / "history.jsonl").exists()  # stopped before the first step


def test_the_nan_message_blames_the_learning_rate_only_when_the_weights_diverged(tiny_model):
    model = _lora(tiny_model)
    finite = T.nonfinite_cause(model, "bf16", 2e-4)
    assert "forward pass overflowed (hardware.precision=bf16)" in finite
    assert "lower training.learning_rate" not in finite
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        lora_a[0, 0] = float("inf")
    diverged = T.nonfinite_cause(model, "fp32", 2e-4)
    assert "diverged" in diverged and "lower training.learning_rate" in diverged
    with torch.no_grad():
        lora_a[0, 0] = 0.0
        next(p for p in model.parameters() if not p.requires_grad)[0, 0] = float("nan")
    assert "frozen backbone weight" in T.nonfinite_cause(model, "fp32", 2e-4)
    half = _lora(tiny_model)
    next(p for n, p in half.named_parameters() if p.requires_grad and "classifier" in n).data = torch.zeros(
        2, 32, dtype=torch.float16)
    assert "float16" in T.nonfinite_cause(half, "fp32", 2e-4) and "learning_rate" not in T.nonfinite_cause(
        half, "fp32", 2e-4)


def test_a_nan_loss_with_a_broken_backbone_says_so_not_lower_the_learning_rate(tiny_model, glue_dir, tmp_path,
                                                                               monkeypatch):
    real = M.build_adapter

    def broken(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "word_embeddings" in n).fill_(float("nan"))
        return model

    monkeypatch.setattr(M, "build_adapter", broken)
    with pytest.raises(T.TrainingError, match="loss became nan at optimizer step 1.*frozen backbone weight") as e:
        main.run(full_cfg("LoRA", tiny_model, glue_dir, tmp_path))
    assert "learning_rate" not in str(e.value)


@pytest.fixture
def cuda_flags():
    """check_precision sets the CUDA matmul flags (torch's CPU build accepts them); put them back afterwards."""
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def fake_gpus(monkeypatch, count: int = 2, capability=(8, 0)):
    """torch.cuda as a node with `count` GPUs of one compute capability; returns the devices each query asked about."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU")
    monkeypatch.setattr(torch.version, "hip", None)
    return asked


def test_precision_on_a_cpu_is_fp32_and_touches_no_cuda_flag(cuda_flags):
    before = torch.backends.cuda.matmul.fp32_precision
    cpu = torch.device("cpu")
    assert T.check_precision("fp32", cpu) == "fp32" and T.check_precision("tf32", cpu) == "fp32"
    assert torch.backends.cuda.matmul.fp32_precision == before
    with pytest.raises(T.TrainingError, match="bf16 needs a GPU with native bf16.*a CPU"):
        T.check_precision("bf16", cpu)
    with pytest.raises(T.TrainingError, match="'fp16'"):
        T.check_precision("fp16", cpu)
    assert T.environment(cpu, 1, "fp32")["precision"] == "fp32"
    assert T.check_precision("auto", cpu) == "fp32" and torch.backends.cuda.matmul.fp32_precision == before


def test_tf32_and_bf16_follow_the_chosen_gpus_compute_capability(monkeypatch, cuda_flags):
    asked = fake_gpus(monkeypatch, capability=(8, 0))
    gpu1 = torch.device("cuda", 1)
    assert T.check_precision("tf32", gpu1) == "tf32" and torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    assert T.check_precision("fp32", gpu1) == "fp32" and torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert T.check_precision("bf16", gpu1) == "bf16"
    assert asked and set(asked) == {gpu1}  # the chosen GPU, not the current one
    fake_gpus(monkeypatch, capability=(7, 0))  # V100: bf16 only emulated, no TF32
    assert T.check_precision("tf32", gpu1) == "fp32" and torch.backends.cuda.matmul.fp32_precision == "ieee"
    with pytest.raises(T.TrainingError, match=r"bf16 needs .* Fake GPU, compute capability 7\.0"):
        T.check_precision("bf16", gpu1)
    assert T.check_precision("auto", gpu1) == "fp32"  # the DeBERTa configs' auto on a V100: no bf16, no TF32
    fake_gpus(monkeypatch, capability=(9, 0))  # H100/H200: auto is bf16
    assert T.check_precision("auto", gpu1) == "bf16" and torch.backends.cuda.matmul.fp32_precision == "tf32"


# ---------------------------------------------------------------------------------------------------------------
# Devices.

def test_sweep_jobs_wrap_around_the_gpus(monkeypatch):
    fake_gpus(monkeypatch, count=3)
    assert [T.pick_device("auto", sweep_job=k).index for k in range(8)] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert [T.pick_device("cuda", sweep_job=k).index for k in (3, 7)] == [0, 1]
    assert T.pick_device("auto") == torch.device("cuda", 0)
    assert T.pick_device("cuda:2", sweep_job=5) == torch.device("cuda", 2)  # an explicit GPU wins
    assert T.pick_device("cpu", sweep_job=5) == torch.device("cpu")
    with pytest.raises(T.TrainingError, match=r"cuda:3: this process sees 3 GPU\(s\), cuda:0..cuda:2.*mod 3"):
        T.pick_device("cuda:3")
    # data parallel: process i takes GPU LOCAL_RANK i
    assert [T.pick_device("auto", process=r).index for r in range(3)] == [0, 1, 2]
    with pytest.raises(T.TrainingError, match="LOCAL_RANK=3 but this process sees 3"):
        T.pick_device("cuda", process=3)
    with pytest.raises(T.TrainingError, match="every process on GPU 1"):
        T.pick_device("cuda:1", process=0)
    with pytest.raises(T.TrainingError, match="one of auto, cpu, cuda, cuda:N"):
        T.pick_device("gpu")


def test_without_a_gpu_auto_is_the_cpu_and_cuda_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert T.pick_device("auto", sweep_job=3) == torch.device("cpu")
    with pytest.raises(T.TrainingError, match="sees no GPU.*CUDA_VISIBLE_DEVICES="):
        T.pick_device("cuda:0")


def test_a_sweep_jobs_number_reaches_the_run(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from tests.test_config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=[f"run={RUNS['LoRA'][0]}", "mode=trial",
                                                       f"results_dir={tmp_path}"], return_hydra_config=True)
    assert main.sweep_job() is None
    with open_dict(cfg):
        cfg.hydra.mode, cfg.hydra.job.num = "MULTIRUN", 7
    HydraConfig.instance().set_config(cfg)
    try:
        assert main.sweep_job() == 7
        seen = {}
        monkeypatch.setattr(T, "train_run", lambda *a, **k: seen.update(k) or {
            "accuracy": 0.5, "train_time_s": 1.0, "rank_budget_total": 1, "trainable_params": 1})
        main.run(compose_run(RUNS["LoRA"][0], "mode=trial", f"results_dir={tmp_path}"))
        assert seen["sweep_job"] == 7
    finally:
        HydraConfig.instance().cfg = None


def test_data_parallel_processes_draw_distinct_cuda_seeds_and_share_the_cpu_one(monkeypatch):
    seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed", seeds.append)
    cpu_states = []
    for rank in range(4):
        T.seed_process(42, torch.device("cuda", rank), rank)
        cpu_states.append(torch.get_rng_state())
    assert seeds[0] == 42 and len(set(seeds)) == 4  # process 0 keeps the run's seed
    assert all(torch.equal(s, cpu_states[0]) for s in cpu_states)  # the weights are initialised from this stream
    seeds.clear()
    T.seed_process(42, torch.device("cpu"), 1)
    assert seeds == []
    grid = {T.cuda_seed(s, r) for s in range(50) for r in range(8)}
    assert len(grid) == 50 * 8  # no two (seed, process) pairs share a stream


def test_the_device_is_set_before_any_cuda_work(monkeypatch, cuda_flags):
    fake_gpus(monkeypatch, count=3)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: calls.append(("manual_seed", s)))
    cfg = compose_run(RUNS["LoRA"][0], "mode=trial")
    device, precision = T.setup_process(cfg, T.Dist(), sweep_job=4)
    assert device == torch.device("cuda", 1) and precision == "bf16"  # the DeBERTa configs: auto -> bf16 (8.0)
    assert calls == [("set_device", torch.device("cuda", 1)), ("manual_seed", cfg.seed)]


class FakeDist(T.Dist):
    """Process `rank` of a two-process run whose collectives return `others` for the other process."""

    def __init__(self, rank: int, others: dict):
        self.world, self.rank, self.local_rank, self.main, self.others = 2, rank, rank, rank == 0, others

    def gather(self, obj) -> list:
        return [obj, self.others] if self.rank == 0 else [self.others, obj]


def test_a_checkpoint_keeps_every_processs_rng_states_and_each_resumes_its_own(tiny_model, tmp_path, monkeypatch):
    gpu_states = {torch.device("cuda", 0): torch.tensor([1], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: gpu_states[d].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: gpu_states.__setitem__(d, s.clone()))
    model = _lora(tiny_model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    hook = M.AdapterHook(model)
    torch.manual_seed(1)
    process1 = {"torch": torch.get_rng_state(), "cuda": torch.tensor([2], dtype=torch.uint8)}
    torch.manual_seed(0)
    process0 = torch.get_rng_state()
    main_process = T.Checkpoints(tmp_path, model, optimizer, scheduler, hook, 2, FakeDist(0, process1),
                                 torch.device("cuda", 0))
    main_process.save(T.LoopState(step=3))
    saved = load_file(tmp_path / "step-0000003" / "state.safetensors")
    assert torch.equal(saved["rng/torch"], process0) and saved["rng/cuda"].tolist() == [1]
    assert torch.equal(saved["rng/process1/torch"], process1["torch"]) and saved["rng/process1/cuda"].tolist() == [2]
    # process 1 of the resumed run, on its own GPU
    gpu_states[torch.device("cuda", 1)] = torch.tensor([9], dtype=torch.uint8)
    torch.manual_seed(5)
    T.Checkpoints(tmp_path, model, optimizer, scheduler, hook, 2, FakeDist(1, {}), torch.device("cuda", 1)
                  ).restore_latest()
    assert torch.equal(torch.get_rng_state(), process1["torch"])
    assert gpu_states[torch.device("cuda", 1)].tolist() == [2]


# ---------------------------------------------------------------------------------------------------------------
# Throughput.

class FakeEvent:
    """A CUDA event: records when it was recorded, and waits (counted) only when asked."""

    clock, waits = 0.0, []

    def __init__(self, enable_timing=False):
        assert enable_timing

    def record(self):
        FakeEvent.clock += 0.25
        self.at = FakeEvent.clock

    def synchronize(self):
        FakeEvent.waits.append(self)

    def elapsed_time(self, end) -> float:
        return (end.at - self.at) * 1000  # ms


def test_the_gpu_step_clock_waits_only_when_flushed(monkeypatch):
    syncs = []
    FakeEvent.waits = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: syncs.append(d))
    st = T.LoopState()
    clock = T.StepClock(st, torch.device("cuda", 0))
    clock.start()
    for _ in range(3):
        clock.count({"input_ids": torch.zeros(2, 5)})
        clock.step()
    assert st.step_times == [] and FakeEvent.waits == [] and len(syncs) == 1  # the steps: no host sync
    assert clock.flush() == pytest.approx(0.25)
    assert len(FakeEvent.waits) == 1 and st.step_times == pytest.approx([0.25] * 3) and st.step_tokens == [10] * 3
    clock.step(pause=0.1)
    clock.stop()
    assert len(syncs) == 2 and st.step_times[-1] == pytest.approx(0.15) and st.rebuild_pause == 0.1


def test_loader_workers_and_pinned_memory_do_not_change_the_data_order(glue_dir, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ds = P.tokenize(P.load_glue("sst2", str(glue_dir), "unused"), tok, 32)

    def order(**kwargs):
        loader = P.make_loaders(ds, tok, 16, 16, 3, **kwargs)[0]
        epochs = []
        for epoch in range(2):  # as the loop does: each epoch from its own seed
            loader.generator.manual_seed(T.epoch_seed(3, epoch))
            epochs.append([b["idx"].tolist() for b in loader])
        return epochs

    assert order(num_workers=2) == order(num_workers=0)
    with warnings.catch_warnings():  # without an accelerator torch skips the pinning, with a warning
        warnings.simplefilter("ignore")
        assert order(pin_memory=True) == order()


def test_length_grouped_batches_pad_less_and_keep_one_order_per_seed_and_epoch(glue_dir, tiny_model):
    """dataset.group_by_length: every example once an epoch, one order per (seed, epoch) whatever the loader
    workers (so a resumed run replays it), another order in the next epoch, and less padding than a random order."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ds = P.tokenize(P.load_glue("mnli", str(glue_dir), "unused"), tok, 64)

    def epochs(**kwargs):
        loader = P.make_loaders(ds, tok, 8, 8, 3, **kwargs)[0]
        out = []
        for epoch in range(2):
            loader.generator.manual_seed(T.epoch_seed(3, epoch))
            out.append([(b["idx"].tolist(), b["input_ids"].numel()) for b in loader])
        return out

    grouped = epochs(group_by_length=True)
    assert grouped == epochs(group_by_length=True, num_workers=2)
    for epoch in grouped:
        assert sorted(i for ids, _ in epoch for i in ids) == list(range(len(ds["train"])))
    assert [ids for ids, _ in grouped[0]] != [ids for ids, _ in grouped[1]]
    padded = {name: sum(n for _, n in run[0]) for name, run in (("grouped", grouped), ("random", epochs()))}
    assert padded["grouped"] < padded["random"], padded


def test_length_grouped_evaluation_reads_longest_first_and_gives_the_file_order_back(glue_dir, tiny_model):
    """dataset.group_by_length: each eval split read longest first (fewer padded tokens than file order), and
    evaluate_split's predictions and labels come back in the split's own order, equal to a file-order pass, also
    gathered from two processes; the forecast's estimate of those tokens (sorted_split_tokens) is exact on the
    split's own lengths."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ds = P.tokenize(P.load_glue("mnli", str(glue_dir), "unused"), tok, 64)
    split = "validation_matched" if "validation_matched" in ds else next(k for k in ds if k != "train")
    lengths = [len(x) for x in ds[split]["input_ids"]]
    grouped = P.make_loaders(ds, tok, 8, 4, 3, group_by_length=True)[1][split]
    plain = P.make_loaders(ds, tok, 8, 4, 3)[1][split]
    firsts = [int(b["attention_mask"].sum(1).max()) for b in grouped]
    assert firsts == sorted(firsts, reverse=True) and firsts[0] == max(lengths)
    tokens = {name: sum(b["input_ids"].numel() for b in loader) for name, loader in (("grouped", grouped),
                                                                                        ("plain", plain))}
    assert tokens["grouped"] < tokens["plain"], tokens
    assert tokens["grouped"] == T.sorted_split_tokens(np.array(lengths), 4, len(lengths)) == P.padded_tokens(
        sorted(lengths, reverse=True), 4)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3,
                                                               ignore_mismatched_sizes=True).eval()
    _, spec = P.task_spec("glue_mnli")
    a = T.evaluate_split(model, grouped, spec, torch.device("cpu"), T.nullcontext)
    b = T.evaluate_split(model, plain, spec, torch.device("cpu"), T.nullcontext)
    assert (a[1] == np.asarray(ds[split]["labels"])).all() and (a[1] == b[1]).all()
    assert (a[0] == b[0]).all() and a[2] == pytest.approx(b[2], rel=1e-5)

    class Sent(FakeDist):  # process 1 of two: what it sends is what process 0 gathers from it
        def gather(self, obj) -> list:
            self.sent = obj
            raise StopIteration

    one = Sent(1, [])
    one.shows = False
    with pytest.raises(StopIteration):
        T.evaluate_split(model, grouped, spec, torch.device("cpu"), T.nullcontext, one)
    assert {b for b, *_ in one.sent} == set(range(1, len(grouped), 2))  # batches 1, 3, ...
    zero = FakeDist(0, one.sent)
    zero.shows = False
    two = T.evaluate_split(model, grouped, spec, torch.device("cpu"), T.nullcontext, zero)
    assert (two[0] == a[0]).all() and (two[1] == a[1]).all() and two[2] == pytest.approx(a[2], rel=1e-12)


def test_data_parallel_shards_of_a_pinned_batch_stay_pinned_and_contiguous(monkeypatch):
    batch = {"input_ids": torch.arange(12).view(6, 2), "labels": torch.arange(6)}
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())
    dist = FakeDist(1, {})
    part, share = dist.shard(batch)
    assert part["labels"].tolist() == [1, 3, 5] and share == 0.5
    assert all(v.is_contiguous() for v in part.values())


# ---------------------------------------------------------------------------------------------------------------
# The readiness check (bench/gpu_check.py), on the CPU with the tiny models.

def load_gpu_check():
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table(out: str) -> dict[tuple[str, str, str], list[str]]:
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 5 and parts[0] in ("LoRA", "AdaLoRA", "GLoRA", "EVA"):
            rows[parts[0], parts[1], parts[2]] = parts[3:]
    return rows


MNLI_RUNS = [f"{m}-DeBERTa-v3-base-86M--GLUE-MNLI" for m in ("comparative-2", "comparative-1", "proposed",
                                                              "comparative-3")]


@pytest.mark.parametrize("stored", [pytest.param("float32", marks=pytest.mark.slow), "float16"])
def test_gpu_check_tries_what_the_study_does_and_writes_its_rates(stored, tiny_model, tiny_fp16, glue_dir,
                                                                    tmp_path, capsys):
    """Every method on the task's own batches (MNLI's files, the run's loader), with GLoRA's reallocation inside
    the timed window, AdaLoRA's budgeting and final phase both timed, an evaluation, a checkpoint saved and the
    step after it retaken exactly (CPU); the rates JSON; and the study's forecast from it."""
    backbone = tiny_model if stored == "float32" else tiny_fp16
    out_file = tmp_path / "rates.json"
    code = load_gpu_check().main_(["--device", "cpu", "--backbone", str(backbone), "--data-dir", str(glue_dir),
                                   "--steps", "8", "--out", str(out_file), "--seeds", "1", "2",
                                   "--set", "adalora.total_rank_budget=48", "dataset.max_length=16"])
    out = capsys.readouterr().out
    rows = table(out)
    assert code == 0 and f"stored {stored}, loaded as float32" in out
    assert "MNLI: batches of 32 (max_length 16, group_by_length True) from files" in out
    for method, phase in (("LoRA", "train"), ("AdaLoRA", "budgeting"), ("GLoRA", "warm-up"), ("EVA", "train")):
        s_step, tokens, peak, syncs, stored_col, trainable, state, status = rows[method, "auto", phase][:8]
        assert float(s_step) > 0 and (peak, syncs) == ("-", "-")  # memory and syncs: GPU only
        assert (stored_col, trainable, state, status) == (stored, "float32", "float32", "ok")
        assert "retaken step equal within 0e+00" in " ".join(rows[method, "auto", phase])  # CPU: exact
    assert ("AdaLoRA", "auto", "final") in rows and ("GLoRA", "auto", "after") in rows
    assert "reallocated at step 4" in " ".join(rows["GLoRA", "auto", "warm-up"])  # the middle of the window
    assert "EVA pass:" in " ".join(rows["EVA", "auto", "train"])
    rates = json.loads(out_file.read_text())
    assert set(rates["methods"]) == {"lora", "adalora", "glora", "eva"}
    glora = rates["methods"]["glora"]
    assert glora["phases"]["warm-up"]["steps"] == 2 and glora["phases"]["after"]["steps"] == 4  # step 1, 4 apart
    assert glora["reallocation_s"] > 0 and glora["resume"]["loss_rdiff"] == 0.0
    assert rates["methods"]["eva"]["init_s"] > 0 and rates["methods"]["lora"]["init_s"] == 0.0
    for name, task in rates["tasks"].items():  # sizes from the files themselves
        key = next(k for k, spec in P.TASKS.items() if spec.folder == name)
        assert task["source"] == "files"
        assert task["sizes"] == {s: len(d) for s, d in P.load_glue(key, str(glue_dir), "unused").items()}
        assert len(task["train_lengths"]) == task["sizes"]["train"] and max(task["train_lengths"]) <= 16
    assert "data parallel: not checked (0 GPU visible" in out
    assert "tune (one study per config" in out and "what is left: 300 tuning trials and 24 runs; the 300 trials and 24 runs with rates" in out


def test_gpu_check_reports_a_rows_first_fault_and_goes_on(tiny_model, glue_dir, tmp_path, capsys):
    code = load_gpu_check().main_(["--device", "cpu", "--backbone", str(tiny_model), "--steps", "6",
                                   "--data-dir", str(glue_dir), "--out", str(tmp_path / "r.json"),
                                   "--runs", *MNLI_RUNS[:3], "--set", "adalora.total_rank_budget=500",
                                   "dataset.max_length=16"])
    rows = table(capsys.readouterr().out)
    assert code == 1
    assert rows["AdaLoRA", "auto", "-"][7:9] == ["FAULT:", "ModelError:"]
    assert "total_rank_budget=500 is infeasible" in " ".join(rows["AdaLoRA", "auto", "-"])
    assert rows["LoRA", "auto", "train"][7] == rows["GLoRA", "auto", "warm-up"][7] == "ok"
    assert set(json.loads((tmp_path / "r.json").read_text())["methods"]) == {"lora", "glora"}


def test_gpu_check_restores_into_a_fresh_set_up_so_state_a_checkpoint_lacks_shows(tiny_model, glue_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    """GLoRA's hook state (its allocation) left out of the checkpoint: restored into a set-up built afresh (at the
    initial ranks, as a resumed process has it) the weights no longer fit, and the row says so. Restored into the
    live model, which already has the new ranks, nothing would have shown."""
    monkeypatch.setattr(M.GloraHook, "state_dict", lambda self: ({}, {}))
    monkeypatch.setattr(M.GloraHook, "load_state_dict", lambda self, tensors, meta: None)
    code = load_gpu_check().main_(["--device", "cpu", "--backbone", str(tiny_model), "--steps", "6",
                                   "--data-dir", str(glue_dir), "--out", str(tmp_path / "r.json"),
                                   "--runs", MNLI_RUNS[2], "--set", "dataset.max_length=16"])
    row = " ".join(table(capsys.readouterr().out)["GLoRA", "auto", "-"])
    assert code == 1 and "FAULT: CheckpointError: checkpoint weights do not match this model" in row


@pytest.mark.slow  # about 50 s here: the hub is asked for each task before the length model is used
def test_gpu_check_without_the_task_files_uses_the_length_model_and_the_official_sizes(tiny_model, tmp_path,
                                                                                        monkeypatch, capsys):
    """No GLUE folder and no hub: random tokens at the MNLI-like model's lengths, GLUE_SIZES, said in the output."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    gc = load_gpu_check()
    code = gc.main_(["--device", "cpu", "--backbone", str(tiny_model), "--steps", "6", "--runs", MNLI_RUNS[0],
                     "--tasks", "MNLI", "RTE", "--out", str(tmp_path / "r.json"), "--seeds", "1",
                     "--study-tasks", "MNLI", "--study-methods", "comparative-2", "--set", "dataset.max_length=256"])
    out = capsys.readouterr().out
    rates = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and "from length model (median 38, p95 85 tokens)" in out
    for name, key in (("MNLI", "mnli"), ("RTE", "rte")):
        assert rates["tasks"][name]["sizes"] == P.GLUE_SIZES[key] and rates["tasks"][name]["source"].startswith(
            "length model")
    # MNLI's 3 epochs at batch 32: ceil(392,702 / 32) = 12,272 steps an epoch
    assert re.search(r"comparative-2-DeBERTa-v3-base-86M--GLUE-MNLI\s+1 todo\s+36816 ", out)


def test_gpu_check_stops_on_a_data_dir_it_cannot_read(tiny_model, glue_dir, tmp_path, capsys):
    """--data-dir that is not a folder, or whose task folder is there but broken: a clear stop before any work, not
    the length model's guess."""
    gc = load_gpu_check()
    with pytest.raises(SystemExit):
        gc.main_(["--device", "cpu", "--backbone", str(tiny_model), "--data-dir", str(tmp_path / "nope")])
    assert "no such folder" in capsys.readouterr().err
    broken = tmp_path / "glue"
    shutil.copytree(glue_dir, broken)
    (broken / "MNLI" / "train.tsv").write_text("not\ta\nGLUE file\n")
    with pytest.raises(SystemExit, match=r"MNLI cannot be read"):
        gc.main_(["--device", "cpu", "--backbone", str(tiny_model), "--data-dir", str(broken), "--steps", "6",
                  "--runs", MNLI_RUNS[0], "--out", str(tmp_path / "r.json")])


def test_the_length_model_has_its_stated_quantiles():
    gc = load_gpu_check()
    lengths = gc.model_lengths(20000, 512)
    assert abs(np.median(lengths) - gc.LENGTH_MODEL["median"]) <= 1
    assert abs(np.percentile(lengths, 95) - gc.LENGTH_MODEL["p95"]) <= 3
    assert gc.model_lengths(1000, 64).max() == 64 and gc.model_lengths(1000, 64).min() >= 3  # truncated, specials


@pytest.mark.slow  # two processes start, each loads torch
def test_gpu_check_runs_the_reallocation_data_parallel_when_asked(tiny_model, glue_dir, tmp_path, capsys):
    code = load_gpu_check().main_(["--device", "cpu", "--backbone", str(tiny_model), "--steps", "6",
                                   "--data-dir", str(glue_dir), "--out", str(tmp_path / "r.json"),
                                   "--runs", MNLI_RUNS[2], "--data-parallel", "on", "--set", "dataset.max_length=16"])
    out = capsys.readouterr().out
    dp = json.loads((tmp_path / "r.json").read_text())["data_parallel"]
    assert code == 0 and dp["status"] == "ok" and dp["processes"] == 2
    assert dp["cross_process_checks"]["GLoRA's new ranks"] == 1 and dp["cross_process_checks"]["trainable parameters"] >= 3
    assert "data parallel, 2 processes" in out


@pytest.mark.parametrize("launcher, precision, ok", [("no", "fp32", True), ("fp32", "fp32", True),
                                                     ("bf16", "fp32", False), ("fp16", "fp32", False),
                                                     ("bf16", "auto", True), ("fp16", "auto", False)])
def test_accelerate_mixed_precision_is_refused_unless_the_config_agrees(monkeypatch, tmp_path, launcher, precision,
                                                                        ok):
    """No Accelerator is built, so `accelerate launch --mixed_precision X` would be silently ignored: it must agree
    with hardware.precision (auto: bf16 where native) or the run stops before anything loads, naming both."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    cfg = compose_run("comparative-2-DeBERTa-v3-base-86M--GLUE-SST-2", "mode=trial", f"results_dir={tmp_path}",
                      f"hardware.precision={precision}", "model.backbone=/nonexistent-not-reached")
    if ok:
        with pytest.raises(M.ModelError, match="nonexistent"):  # past the check, stopped by the model folder's
            main.prepare(cfg)
    else:
        with pytest.raises(main.ConfigError, match=f"--mixed_precision {launcher} is not applied.*precision={precision}"):
            main.prepare(cfg)


@pytest.mark.slow  # torch.compile's first compile takes tens of seconds on a CPU
def test_hardware_compile_matches_eager_and_recompiles_once_at_the_rebuild(tiny_model, glue_dir, tmp_path):
    """hardware.compile=true: the same run as eager within 1e-6 on the CPU (no dropout: compiled code draws other
    masks), GLoRA's rebuild inside it; GLoRA's run compiles at most twice LoRA's graphs (one recompile)."""
    from tests.conftest import run_cli

    folder = tmp_path / "no-dropout"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update({k: 0.0 for k in config if k.endswith("dropout_prob") or k.endswith("dropout")})
    (folder / "config.json").write_text(json.dumps(config))
    summaries = {}
    for method, run_id, extra in (("LoRA", "comparative-2-DeBERTa-v3-base-86M--GLUE-RTE", []),
                                  ("GLoRA", "proposed-DeBERTa-v3-base-86M--GLUE-RTE",
                                   ["glo_ra.total_rank_budget=60", "glo_ra.warmup_steps=3"])):
        for compiled in (False, True):
            out = tmp_path / f"{method}-{compiled}"
            proc = run_cli(f"run={run_id}", "mode=full", "wandb.mode=disabled", "optuna.n_trials=0",
                           "hardware.device=cpu", f"model.backbone={folder}", f"dataset.data_dir={glue_dir}",
                           f"results_dir={out}", "training.epochs=1", "dataset.batch_size=8",
                           "training.lr_warmup_steps=0", "model.peft.lora_dropout=0.0", "training.eval_every_steps=4",
                           f"hardware.compile={str(compiled).lower()}", *extra, timeout=900)
            assert proc.returncode == 0, proc.stderr[-3000:]
            summaries[method, compiled] = json.loads((out / run_id / "summary.json").read_text())
    for method in ("LoRA", "GLoRA"):
        eager, comp = summaries[method, False], summaries[method, True]
        assert "compile" not in eager and comp["compile"]["graphs"] >= 1
        assert comp["loss"] == pytest.approx(eager["loss"], abs=1e-6)
        assert comp["final_ranks"] == eager["final_ranks"]
        w_eager = load_file(tmp_path / f"{method}-False" / eager["run_id"] / "adapter" / "adapter_model.safetensors")
        w_comp = load_file(tmp_path / f"{method}-True" / comp["run_id"] / "adapter" / "adapter_model.safetensors")
        assert all(torch.allclose(w_eager[k], w_comp[k], atol=1e-6, rtol=0) for k in w_eager)
    assert summaries["GLoRA", True]["realloc_step"] == 3
    assert summaries["GLoRA", True]["compile"]["graphs"] <= 2 * summaries["LoRA", True]["compile"]["graphs"]
