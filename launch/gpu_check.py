"""The steps of the GPU acceptance check (`launch/gpu_check.sh`, which runs them in order): each step runs
the real launchers (torchrun launch/train.py, eval, predict, export) or the torch-only benches, asserts,
and prints one line: `ok   <step>: <figures>`, or `FAIL <step>: <why>` and exit 1.

    python -m launch.gpu_check STEP [STEP ...] --mode gpu|cpu|torch-only --out DIR

Modes: `gpu` (the CUDA stack, NCCL, bf16), `cpu` (the same steps on gloo in fp32, smaller: what
tests/test_gpu_check.py runs so the script cannot rot), `torch-only` (a GPU box without TorchRec: the
dense arch, LONGER and Sparse-MoE benches, head logits, AUC at scale).

The script runs each GPU step in a process of its own; the CPU mode runs every step in one process, whose
1-rank jobs (the data generator, eval, LONGER, predict, export) run their launcher's own code in it
(`run(..., here=True)`) instead of starting an interpreter that imports TorchRec again; its multi-rank
jobs are torchrun jobs as on the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mode:
    """Sizes and expectations per mode: the GPU check runs make train's model at GPU batch sizes, the CPU
    mode the same steps small enough for a test on 2 cores."""

    name: str
    device: str  # cuda | cpu
    backend: str  # what the start line must name
    nproc: int
    rows: int  # generated train rows
    batch_size: int
    train_steps: int
    compare_steps: int  # steps after the shared checkpoint, per sharding type
    autocast: str
    # the CPU mode's train run is fp32 like the comparison runs: it goes on to their end (checkpointing
    # where they start) and is the uninterrupted run the resume check compares with, one run fewer; the
    # GPU's is bf16, so the GPU mode trains an fp32 table_wise run of its own for that
    train_is_reference: bool = False
    # 1-rank jobs in this process (`run(..., here=True)`), on a 1-rank gloo group of their own
    in_process: bool = False
    longer_batch_size: int = 0  # the LONGER step's data.batch_size; 0: batch_size

    @staticmethod
    def of(name: str) -> Mode:
        if name == "cpu":
            # the LONGER step's 20 steps at batch 64: its check is finite losses on this stack, not speed
            return Mode("cpu", "cpu", "gloo", 2, 90_000, 512, 60, 20, "off", True, True, 64)
        import torch

        gpus = torch.cuda.device_count()
        # NCCL takes one rank per GPU: a 1-GPU box checks every step on one rank
        return Mode(name, "cuda", "cpu:gloo,cuda:nccl", max(1, min(gpus, 2)), 400_000, 1024, 200, 50, "bf16")


class CheckFailed(Exception):
    pass


def check(condition: bool, why: str) -> None:
    if not condition:
        raise CheckFailed(why)


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: int = 600, here: bool = False) -> str:
    """Run a launcher (`[python, script or -m module, args...]`); its combined output, or CheckFailed with
    its last lines. `here`: in this process (`run_here`)."""
    if here:
        code, out = run_here(cmd[1:], env)
    else:
        merged = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
        proc = subprocess.run(cmd, cwd=ROOT, env=merged, capture_output=True, text=True, timeout=timeout)
        code, out = proc.returncode, proc.stdout + proc.stderr
    if code != 0:
        lines = out.strip().splitlines()
        errors = [line for line in lines if line.startswith("error") or "Error:" in line]
        tail = " | ".join(errors[:2] or lines[-3:])
        raise CheckFailed(f"`{' '.join(cmd[-6:])}` exited {code}: {tail}")
    return out


def run_here(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """`python <argv>` in this process (`launch.cli.run_launcher_here`): (exit code, combined output)."""
    import torch.distributed as dist

    from launch.cli import run_launcher_here  # not at import: the torch-only mode has no TorchRec

    check(not dist.is_initialized(), "a process group is up in the check's own process")
    code, out, err = run_launcher_here(argv, env)
    return code, out + err


def torchrun(mode: Mode, script: str, *overrides: str, nproc: int | None = None, env=None) -> str:  # noqa: ANN001
    n = nproc or mode.nproc
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    if n == 1:  # a plain process is a 1-rank group too (pipeline/dist.py), without the agent's start-up
        cmd = [sys.executable]
    return run([*cmd, script, *overrides], env, here=n == 1 and mode.in_process)


def train_overrides(mode: Mode, out: Path, run_name: str, *extra: str) -> list[str]:
    """make train's model and data layout; the paper recipe (a constant lr after warmup), so a run cut
    short and resumed follows the same schedule as one that was not. `extra` wins over the defaults."""
    defaults = [
        f"data.root={out / 'data'}",
        f"trainer.run_dir={out / run_name}",
        "recipe=paper",
        "optim.dense.warmup_steps=20",  # the short runs here learn within their steps
        f"data.batch_size={mode.batch_size}",
        "data.eval_batch_size=4096",
        "trainer.progress_bar=false",
        f"trainer.device={mode.device}",
        f"trainer.autocast={mode.autocast}",
        "trainer.log_every=10",
        "trainer.epochs=1000",  # trainer.max_steps ends each run
        # the final state is evaluated: a run resumed from another run's checkpoint would otherwise look
        # for that run's best-validation checkpoint in its own run dir
        "trainer.early_stop.select_best=false",
    ]
    keys = {e.split("=", 1)[0] for e in extra}
    return [d for d in defaults if d.split("=", 1)[0] not in keys] + list(extra)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> mean train loss of the logged records."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r.get("kind") == "train"}


def checkpoint_of(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def train_end(mode: Mode) -> int:
    """The train run's last step: `train_steps`, or the comparison runs' end where it is their reference
    (`Mode.train_is_reference`)."""
    return mode.train_steps + (mode.compare_steps if mode.train_is_reference else 0)


def plan_rows(log: str) -> list[tuple[str, str, str]]:
    """(table, sharding, kernel) of each row of the sharding plan a train log prints."""
    return re.findall(r"^model\.\S+\s+(\S+)\s+(\S+)\s+(\S+)\s", log, flags=re.M)


# ---------------------------------------------------------------- steps that need TorchRec


def step_stack(mode: Mode, out: Path) -> str:
    import torch

    from pipeline.stack import current_stack, stack_problem

    problem = stack_problem(mode.device)
    check(problem is None, str(problem))
    import fbgemm_gpu  # noqa: F401 - registers torch.ops.fbgemm

    lengths = torch.tensor([2, 0, 3], device=mode.device)
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    check(offsets.tolist() == [0, 2, 2, 5], f"fbgemm complete_cumsum on {mode.device}: {offsets.tolist()}")
    return f"{current_stack()}; an FBGEMM op ran on {offsets.device}"


def step_data(mode: Mode, out: Path) -> str:
    data = out / "data"
    if not (data / "dataset.json").exists():
        cmd = [sys.executable, "-m", "data.build.generate", "--root", str(data), "--rows", str(mode.rows)]
        run(cmd, here=mode.in_process)
    return f"{mode.rows} train rows in {data}"


def step_train(mode: Mode, out: Path) -> str:
    """make train's model for `train_steps` (bf16 on a GPU; on CPU on to `train_end`, a checkpoint at
    `train_steps`): finite losses, test mean AUC > 0.6, the start line's device and backend, fused kernels
    only, nothing left unpipelined; samples/s and dense MFU."""
    import torch

    from launch.benchmarks.timing import measure_gemm_peak

    steps = [f"trainer.max_steps={train_end(mode)}"]
    if mode.train_is_reference:  # the comparison runs start from the checkpoint of step train_steps
        steps.append(f"trainer.checkpoint_every={mode.train_steps}")
    log = torchrun(mode, "launch/train.py", *train_overrides(mode, out, "train", *steps))
    (out / "train.log").write_text(log)
    device = "cuda:0" if mode.device == "cuda" else "cpu"
    check(
        f"device {device}" in log and f"backend {mode.backend}" in log,
        f"start line lacks {device} / {mode.backend}",
    )
    check("will be pipelined" in log and "will NOT be pipelined" not in log, "the step is not pipelined")
    kernels = [kernel for _, _, kernel in plan_rows(log)]
    check(
        kernels and set(kernels) == {"fused"}, f"planned kernels {sorted(set(kernels))}, expected fused only"
    )
    run_dir = out / "train"
    losses = train_losses(run_dir)
    check(losses and all(math.isfinite(v) for v in losses.values()), f"non-finite train loss: {losses}")
    first, last = losses[min(losses)], losses[max(losses)]
    check(last < first - 0.02, f"the train loss did not drop: {first:.4f} -> {last:.4f}")
    m = metrics(run_dir)
    aucs = [m["test"][f"{t}/auc"] for t in ("finish", "skip")]
    check(m["test"]["mean_auc"] > 0.6, f"test mean AUC {m['test']['mean_auc']:.4f} (tasks {aucs}) not > 0.6")
    dtype = torch.bfloat16 if mode.autocast == "bf16" else torch.float32
    peak = measure_gemm_peak(torch.device(mode.device), dtype, 4096 if mode.device == "cuda" else 1024, 5)
    per_device = m["train_samples_per_s"] / mode.nproc
    mfu = 3 * m["dense_flops_per_sample"] * per_device / peak  # forward + backward (2x)
    return (
        f"{m['steps']} steps, loss {first:.4f} -> {last:.4f}, test AUC finish {aucs[0]:.4f} "
        f"skip {aucs[1]:.4f} (mean {m['test']['mean_auc']:.4f}); "
        f"{m['train_samples_per_s']:.0f} samples/s on {mode.nproc} {mode.device} rank(s); dense MFU "
        f"{mfu:.2%} of the measured {dtype} GEMM peak {peak / 1e12:.2f} TFLOP/s; {len(kernels)} tables fused"
    )


SHARDINGS = {  # name -> overrides; row_wise on the mean-pooled table shared with the sequence (category)
    "table_wise": ["sharding.types=[table_wise]"],
    "row_wise": ["sharding.types=[table_wise]", "+sharding.per_table.category=[row_wise]"],
    "table_row_wise": ["sharding.types=[table_row_wise]"],
    "column_wise": ["sharding.types=[column_wise]"],
    "data_parallel": ["sharding.types=[data_parallel]"],
}


def shardings(mode: Mode) -> list[str]:
    """table_row_wise places shards by host and is offered on CUDA only by TorchRec's sharder; the CPU
    mode compares row_wise only (tests/test_reliability.py's two-node test compares column_wise there).
    data_parallel is not compared: TorchRec's data_parallel tables take no fused optimizer, so they train
    with the dense one (RMSProp at the dense lr: pipeline/sharding.py warns), and a checkpoint of fused
    tables does not resume into them (its optimizer state has other keys)."""
    names = [s for s in SHARDINGS if s != "data_parallel"]
    return names if mode.device == "cuda" else ["table_wise", "row_wise"]


def step_sharding(mode: Mode, out: Path) -> str:
    """fp32, `compare_steps` steps from the train step's checkpoint under each sharding type: every final
    train loss and test AUC within 1e-3 of table_wise's."""
    start = checkpoint_of(out / "train", mode.train_steps)
    end = mode.train_steps + mode.compare_steps
    result = {}
    for name in shardings(mode):
        run_dir = out / f"shard_{name}"
        cut = (  # step_resume's; where the train run is the reference, it resumes nothing
            [f"trainer.checkpoint_every={resume_cut(mode)}"]
            if name == "table_wise" and not mode.train_is_reference
            else []
        )
        torchrun(mode, "launch/train.py", *train_overrides(
            mode, out, run_dir.name, f"trainer.resume={start}", f"trainer.max_steps={end}",
            "trainer.autocast=off", *SHARDINGS[name], *cut))  # fmt: skip
        m = metrics(run_dir)
        result[name] = (train_losses(run_dir)[end], m["test"]["finish/auc"], m["test"]["skip/auc"])
    ref = result["table_wise"]
    worst = {n: max(abs(a - b) for a, b in zip(v, ref)) for n, v in result.items()}
    bad = {n: d for n, d in worst.items() if d > 1e-3}
    check(not bad, f"differ from table_wise by more than 1e-3: {bad}")
    return f"steps {mode.train_steps}->{end} fp32; max |diff| vs table_wise: " + ", ".join(
        f"{n} {d:.1e}" for n, d in worst.items() if n != "table_wise"
    )


def resume_cut(mode: Mode) -> int:
    """The step the resumed run starts from: the table_wise comparison run's checkpoint halfway (a log
    step: log_every 10); where the train run is the reference, the comparisons' start."""
    if mode.train_is_reference:
        return mode.train_steps
    return mode.train_steps + mode.compare_steps // 20 * 10


def step_resume(mode: Mode, out: Path) -> str:
    """Resume the table_wise comparison run from its checkpoint halfway, in a run dir of its own, as a job
    restarted there would: the same train losses at every log step after the cut, and the same test
    metrics as the uninterrupted run. Where the train run is the reference (CPU), the table_wise
    comparison run is that resumed job, resumed from the train run's checkpoint of step `train_steps`, and
    the train run, which went on to the same end with the same table_wise plan, the uninterrupted one."""
    half, end = resume_cut(mode), mode.train_steps + mode.compare_steps
    if mode.train_is_reference:
        whole_dir, run_dir = out / "train", out / "shard_table_wise"
        plan = {sharding for _, sharding, _ in plan_rows((out / "train.log").read_text())}
        check(plan == {"table_wise"}, f"the train run's plan is {sorted(plan)}, not table_wise only")
    else:
        whole_dir, run_dir = out / "shard_table_wise", out / "resumed"
        base = train_overrides(mode, out, run_dir.name, "trainer.autocast=off", *SHARDINGS["table_wise"])
        cut = checkpoint_of(whole_dir, half)
        torchrun(mode, "launch/train.py", *base, f"trainer.resume={cut}", f"trainer.max_steps={end}")
    whole, resumed = metrics(whole_dir), metrics(run_dir)
    # the test metrics of the final state (a logged train loss is a mean over its log window, which the
    # cut moves)
    keys = [k for k in whole["test"] if k.endswith(("/auc", "/uauc", "/logloss"))]
    diffs = [abs(whole["test"][k] - resumed["test"][k]) for k in keys]
    whole_losses, resumed_losses = train_losses(whole_dir), train_losses(run_dir)
    after = [s for s in whole_losses if s > half]
    check(after and all(s in resumed_losses for s in after), f"resumed run logged {sorted(resumed_losses)}")
    diffs += [abs(whole_losses[s] - resumed_losses[s]) for s in after]
    check(max(diffs) <= 1e-6, f"resumed run differs from the uninterrupted one by {max(diffs):.2e}")
    first = 0 if mode.train_is_reference else mode.train_steps  # where the run cut at `half` started
    return (
        f"steps {first}->{half}, resumed ->{end}: max |diff| {max(diffs):.1e} vs uninterrupted "
        f"over the losses of steps {after} and {len(keys)} test metrics"
    )


def step_eval(mode: Mode, out: Path) -> str:
    """launch/eval.py of the train checkpoint on the GPU vs on the CPU (`CUDA_VISIBLE_DEVICES=`); the CPU
    mode compares the train run's own final evaluation (2 ranks) with launch/eval.py on 1 rank. The same
    metrics within 1e-4."""
    ckpt = checkpoint_of(out / "train", train_end(mode))
    if mode.device == "cuda":
        first = out / "eval_device"
        torchrun(mode, "launch/eval.py", f"checkpoint={ckpt}", f"output={first}", "device=cuda")
        a = json.loads((first / "metrics.json").read_text())
    else:
        a = metrics(out / "train")  # trainer.early_stop.select_best=false: the final state, this checkpoint
    second = out / "eval_cpu"
    torchrun(mode, "launch/eval.py", f"checkpoint={ckpt}", f"output={second}", "device=cpu",
             nproc=1 if mode.device == "cpu" else mode.nproc, env={"CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    b = json.loads((second / "metrics.json").read_text())
    keys = [k for k in a["test"] if k.endswith(("/auc", "/uauc", "/logloss"))]
    diff = max(abs(a["test"][k] - b["test"][k]) for k in keys)
    check(diff <= 1e-4, f"{mode.device} eval vs CPU eval differ by {diff:.2e}")
    other = "1 CPU rank" if mode.device == "cpu" else "the CPU"
    return (
        f"eval on {mode.nproc} {mode.device} rank(s) vs {other}: max |diff| {diff:.1e}, {len(keys)} metrics"
    )


def step_longer(mode: Mode, out: Path) -> str:
    """20 steps of make train's model with model.sequence=longer: finite losses. The CPU mode trains it on
    1 rank at a smaller batch (tests/test_train_e2e.py trains LONGER sharded over 2 ranks)."""
    run_dir = out / "longer"
    batch = [f"data.batch_size={mode.longer_batch_size}"] if mode.longer_batch_size else []
    torchrun(mode, "launch/train.py", *train_overrides(mode, out, run_dir.name, "model.sequence=longer",
             "trainer.max_steps=20", "trainer.final_eval=false", "trainer.log_every=5", *batch),
             nproc=1 if mode.in_process else mode.nproc)  # fmt: skip
    losses = train_losses(run_dir)
    check(len(losses) == 4 and all(math.isfinite(v) for v in losses.values()), f"LONGER losses {losses}")
    return f"model.sequence=longer: 20 steps, losses {losses[5]:.4f} -> {losses[20]:.4f}"


def step_predict(mode: Mode, out: Path) -> str:
    import pyarrow.parquet as pq

    pred = out / "predictions"
    # the CPU mode on 1 rank (tests/test_serving.py checks 2-rank predictions row for row)
    torchrun(mode, "launch/predict.py", f"checkpoint={out / 'train'}", f"out={pred}", f"device={mode.device}",
             nproc=1 if mode.in_process else mode.nproc)  # fmt: skip
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in pred.glob("*.parquet"))
    test_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in (out / "data" / "test").glob("*.parquet"))
    check(rows == test_rows, f"{rows} predictions for {test_rows} test rows")
    return f"launch/predict.py: {rows} rows scored"


def step_export(mode: Mode, out: Path) -> str:
    art = out / "artifact"
    run(
        [sys.executable, "launch/export.py", f"checkpoint={out / 'train'}", f"out={art}"],
        here=mode.in_process,
    )
    diff = json.loads((art / "manifest.json").read_text())["parity"]["max_abs_logit_diff"]
    check(diff <= 1e-4, f"export parity {diff:.2e} > 1e-4")
    return f"launch/export.py: parity max |logit diff| {diff:.1e}"


def step_sync(mode: Mode, out: Path) -> str:
    """20 training steps under torch.cuda.set_sync_debug_mode("error"), away from log and checkpoint
    steps (which sync on purpose): a host sync raises and fails the run."""
    check(mode.device == "cuda", "the sync check needs CUDA")
    overrides = ["trainer.max_steps=40", "trainer.log_every=1000", "trainer.sync_debug_steps=[10,30]"]
    torchrun(
        mode, "launch/train.py", *train_overrides(mode, out, "sync", *overrides, "trainer.final_eval=false")
    )
    return "steps 10-30 under sync debug mode 'error': no host sync"


# ---------------------------------------------------------------- torch-only steps (no TorchRec)


def bench(mode: Mode, out: Path, name: str, *args: str) -> dict:
    path = out / f"bench_{name}.json"
    run([sys.executable, "launch/bench.py", name, "--device", mode.device, *args, "--json", str(path)])
    return json.loads(path.read_text())


def step_dense(mode: Mode, out: Path) -> str:
    r = bench(mode, out, "dense", "--preset", "rankmixer_100m", "--dtype", "bf16", "--batch-size", "4096")
    peak = next(iter(r["gemm_peak_gflop_s"].values()))
    rows = ", ".join(f"{x['model']} {x['samples_per_s']:.0f} samples/s MFU {x['mfu']:.1%}" for x in r["rows"])
    return f"training step, bf16, batch 4096, vs the measured GEMM peak {peak / 1e3:.1f} TFLOP/s: {rows}"


def step_longer_bench(mode: Mode, out: Path) -> str:
    r = bench(mode, out, "longer")
    return f"LONGER: {len(r['cost'])} lengths timed, KV-cache serving at {len(r['serving'])} candidate counts"


def step_moe(mode: Mode, out: Path) -> str:
    r = bench(mode, out, "moe", "--preset", "rankmixer_1b_smoe", "--batch-size", "2048")
    speed = ", ".join(f"ratio {x['target_ratio']:g}: {x['speedup']:.2f}x" for x in r["rows"])
    return f"rankmixer_1b_smoe sparse vs dense inference: {speed}"


def step_logits(mode: Mode, out: Path) -> str:
    """The dense arch's task logits under bf16 autocast come out of fp32 heads: as many distinct values
    as fp32 logits, and the same AUC."""
    import torch

    from data.metrics.auc import binary_auc
    from launch.benchmarks.dense import load_preset
    from models.rankmixer import RankMixer

    device = torch.device(mode.device)
    torch.manual_seed(0)
    groups = [64] * 8
    # CPU bf16 matmul is orders of magnitude slower than fp32: a smaller model and batch there (1024 rows:
    # logits rounded to bf16 would be ~2/3 distinct, far below the 99% asked)
    preset, rows = ("rankmixer_small", 65536) if device.type == "cuda" else ("rankmixer_tiny", 1024)
    arch = RankMixer(load_preset(preset, groups, 2)).to(device).eval()
    x = [torch.randn(rows, g, device=device) for g in groups]
    labels = (torch.rand(rows, device=device) < 0.3).float()
    with torch.no_grad():
        fp32 = arch(x)[:, 0]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            mixed = arch(x)[:, 0]
    check(mixed.dtype == torch.float32, f"logits under autocast are {mixed.dtype}")
    n32, nmix = fp32.unique().numel(), mixed.unique().numel()
    a32, amix = binary_auc(fp32, labels), binary_auc(mixed, labels)
    check(nmix >= 0.99 * n32, f"{nmix} distinct bf16-run logits vs {n32} fp32")
    return (
        f"{preset}, {rows} rows: {nmix} distinct logits under bf16 autocast, {n32} in fp32; "
        f"AUC {amix:.6f} vs {a32:.6f}"
    )


def step_auc(mode: Mode, out: Path) -> str:
    """Exact AUC and UAUC of 100M rows on the GPU (2M in CPU mode)."""
    import time

    import torch

    from data.metrics.auc import binary_auc, user_auc

    rows = 100_000_000 if mode.device == "cuda" else 2_000_000
    device = torch.device(mode.device)
    g = torch.Generator(device=device).manual_seed(0)
    labels = (torch.rand(rows, device=device, generator=g) < 0.2).float()
    scores = labels * 0.5 + torch.randn(rows, device=device, generator=g)
    users = torch.randint(0, rows // 100, (rows,), device=device, generator=g)  # ~100 rows per user
    t0 = time.perf_counter()
    a, u = binary_auc(scores, labels), user_auc(scores, labels, users)["uauc"]
    seconds = time.perf_counter() - t0
    expected = 0.6382  # P(N(0.5, 1) > N(0, 1)) = Phi(0.5 / sqrt(2))
    check(
        abs(a - expected) < 2e-3 and abs(u - expected) < 5e-3,
        f"AUC {a:.4f} UAUC {u:.4f}, expected ~{expected}",
    )
    return f"{rows:,} rows on {device}: AUC {a:.5f}, UAUC {u:.5f} in {seconds:.1f} s"


STEPS: dict[str, Callable[[Mode, Path], str]] = {
    "stack": step_stack,
    "data": step_data,
    "train": step_train,
    "sharding": step_sharding,
    "resume": step_resume,
    "eval": step_eval,
    "longer": step_longer,
    "predict": step_predict,
    "export": step_export,
    "sync": step_sync,
    "dense": step_dense,
    "longer_bench": step_longer_bench,
    "moe": step_moe,
    "logits": step_logits,
    "auc": step_auc,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("steps", nargs="+", choices=sorted(STEPS), metavar="STEP", help="run in this order")
    parser.add_argument("--mode", choices=["gpu", "cpu", "torch-only"], default="gpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    mode = Mode.of(args.mode)
    for step in args.steps:
        try:
            line = STEPS[step](mode, args.out)
        except CheckFailed as e:
            print(f"FAIL {step}: {e}", flush=True)
            sys.exit(1)
        print(f"ok   {step}: {line}", flush=True)


if __name__ == "__main__":
    main()
