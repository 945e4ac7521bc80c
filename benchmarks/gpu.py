"""Prepared GPU check: the main job, a margin-head fp16/bf16 stress, the kNN and head benchmarks.

    python benchmarks/gpu.py                          # on a CUDA machine: all four parts
    python benchmarks/gpu.py --only stress knn        # some parts
    python benchmarks/gpu.py --device cpu --only stress --steps 50   # the stress on CPU

Parts (each prints a short progress line; all figures are printed together at the end):

main    ``lightning-metric fit --config examples/configs/glyphs_arcface.yaml`` for one epoch on
        the device, in a fresh subprocess, outputs in a temporary directory. The W&B logger
        is swapped for a CSVLogger in that directory (``--trainer.logger=false`` itself cannot
        run this config: its LearningRateMonitor refuses a Trainer without a logger). The
        precision is the config's / run-time choice unless ``--precision`` is given; the one
        used is reported. Figures: wall time, training steps/s (validation excluded),
        final val/recall@1.
stress  every margin head of ``lightning_metric.heads`` trained ``--steps`` SGD steps (on the
        embeddings and the class centres) under fp16 and bf16 autocast with embeddings that
        sit on their class centre (cos = 1 exactly, and 1 - 1e-7), opposite it (cos = -1
        exactly, and -1 + 1e-7), and two classes sharing a centre (a non-target cos of 1).
        Each step runs ``forward`` (its logits must be float32 and finite), the dense ``loss``
        and the streaming (chunked) ``loss``; both losses and all their gradients must be
        finite. Every few steps the embeddings are re-seated exactly on the (updated,
        autocast-dtype-rounded) centres so the whole run stays at |cos| ~ 1; steps alternate
        between float32 embeddings and embeddings already in the autocast dtype (what a neck
        under autocast hands the head). A step whose gradients are not finite is skipped
        (as GradScaler would), so the count is of bad steps, not of a diverged run.
knn     ``benchmarks/retrieval.py --device cuda`` (1M x 512 leave-one-out recall, checked
        against exact float32 on a sample).
heads   ``benchmarks/heads.py --device cuda --rounds 1`` (ours vs pytorch-metric-learning,
        C = 1M / 10M classes).

Exit status: 0 when every part ran and the stress found no non-finite step, 1 otherwise.
Without a CUDA device (and no ``--device cpu``) it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lightning_metric.heads import MarginHead  # noqa: E402

CONFIG = ROOT / "examples" / "configs" / "glyphs_arcface.yaml"
PARTS = ("main", "stress", "knn", "heads")
RESULT_MARK = "GPU_CHECK_RESULT "
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
# What a stress step checks, in the order of the per-step flags.
CHECKS = ("logits", "loss", "loss stream", "grad", "grad stream", "params")

HeadFactory = Callable[[int, int], MarginHead]


# ----------------------------------------------------------------------------- stress
@dataclass
class StressResult:
    """Outcome of one head under one autocast dtype."""

    head: str
    dtype: str
    steps: int = 0  # steps run
    nonfinite: int = 0  # steps where any check failed
    first_bad: int | None = None
    failed: Counter[str] = field(default_factory=Counter)  # check name -> steps it failed
    logits_dtypes: set[str] = field(default_factory=set)
    skipped: str | None = None  # why this combination did not run
    error: str | None = None  # an exception that stopped it
    incomplete: str | None = None  # the time limit stopped it early
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        if self.skipped is not None:
            return True
        clean = self.error is None and self.incomplete is None and self.nonfinite == 0
        return clean and self.logits_dtypes == {"float32"}

    def cell(self) -> str:
        if self.skipped is not None:
            return "skipped"
        if self.error is not None:
            return "ERROR"
        text = f"{self.nonfinite}/{self.steps}"
        if self.nonfinite:
            text += f" (first {self.first_bad})"
        if self.logits_dtypes != {"float32"}:
            text += f" logits {','.join(sorted(self.logits_dtypes))}"
        if self.incomplete is not None:
            text += " INCOMPLETE"
        return text


def default_heads(variants: bool = True) -> dict[str, HeadFactory]:
    """Every concrete margin head exported by ``lightning_metric.heads``, default settings.

    ``variants`` adds settings that take a different code path: CombinedMargin with
    ``m1 != 1`` computes ``cos(m1 * acos(cos) + m2)`` (the defaults use the acos-free
    addition formula).
    """
    import lightning_metric.heads as heads

    out: dict[str, HeadFactory] = {}
    for name in heads.__all__:
        obj = getattr(heads, name)
        if isinstance(obj, type) and issubclass(obj, MarginHead) and obj is not MarginHead:
            out[name] = obj
    if variants:
        out["CombinedMargin m1=0.9"] = functools.partial(heads.CombinedMarginHead, m1=0.9)
    return out


def autocast_works(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``torch.autocast(device, dtype)`` really computes in ``dtype``, else why not."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device.type, dtype=dtype):
                a = torch.ones(2, 2, device=device)
                got = (a @ a).dtype
    except Exception as e:  # noqa: BLE001
        return f"autocast({device.type}, {dtype}) fails: {e}"
    if got != dtype:
        return f"autocast({device.type}, {dtype}) is not supported here (matmul gave {got})"
    return None


class _Seating:
    """Class centres and embeddings placed at |cos| ~ 1, re-seated on demand.

    Rows of the batch cycle through four kinds: an exact copy of a centre (cos = 1), a copy
    turned by acos(1 - 1e-7) (cos = 1 - 1e-7), the exact opposite (cos = -1) and the turned
    opposite (cos = -1 + 1e-7); their norms cycle through powers of two (exact in every
    dtype; AdaFace sees different norms). The first classes have centres made of +-0.5 on
    four coordinates, whose float32 self-cosine is exactly 1 even through a TF32 matmul;
    the others are random. Class 1 shares class 0's centre(s).
    """

    NORMS = (1.0, 4.0, 0.25, 64.0)
    COS_OFF = 1e-7

    def __init__(
        self, head: MarginHead, batch: int, amp_dtype: torch.dtype, gen: torch.Generator
    ) -> None:
        dev = head.weight.device
        c, k, d = head.num_classes, head.sub_centers, head.embedding_dim
        self.amp_dtype = amp_dtype
        self.labels = (torch.arange(batch) % c).to(dev)
        i = torch.arange(batch)
        self.kind = (i % 4).to(dev)
        self.norm = torch.tensor(self.NORMS)[(i // 4) % len(self.NORMS)].to(dev)
        self.sub = ((i // 16) % k).to(dev)  # which sub-centre a row copies
        self.rows = self.labels * k + self.sub
        self.noise = torch.randn(batch, d, generator=gen, dtype=torch.float64).to(dev)
        # Initial centres: random unit rows, then the exact-cosine ones.
        w = F.normalize(torch.randn(c * k, d, generator=gen), dim=1)
        n_exact = min(c * k, max(1, (c * k) // 8), d // 4)
        for r in range(n_exact):
            signs = torch.where(torch.rand(4, generator=gen) < 0.5, -0.5, 0.5)
            w[r] = 0.0
            w[r, 4 * r : 4 * r + 4] = signs
        self.exact = w[:n_exact].clone().to(dev)
        with torch.no_grad():
            head.weight.copy_(w.to(head.weight))

    @torch.no_grad()
    def seat(self, head: MarginHead, emb: Tensor) -> None:
        """Put the embeddings back on the (SGD-updated) centres.

        The centres are re-normalised and rounded to the autocast dtype (so a copy of one is
        exact in it too) and the exact-cosine centres restored.
        """
        w = head.weight
        k = head.sub_centers
        w.copy_(F.normalize(w.float(), dim=1).to(self.amp_dtype).float())
        w[: len(self.exact)] = self.exact
        if head.num_classes > 1:
            w[k : 2 * k] = w[:k]  # class 1 shares class 0's centres: a non-target cos = 1
        centre = w[self.rows].double()
        unit = centre / centre.norm(dim=1, keepdim=True)
        # A direction orthogonal to the centre, for the turned rows.
        ortho = self.noise - (self.noise * unit).sum(1, keepdim=True) * unit
        ortho = ortho / ortho.norm(dim=1, keepdim=True)
        theta = math.acos(1.0 - self.COS_OFF)
        turned = math.cos(theta) * unit + math.sin(theta) * ortho
        kind = self.kind.unsqueeze(1)
        x = torch.where(kind == 0, centre, turned * centre.norm(dim=1, keepdim=True))
        x = torch.where(kind >= 2, -x, x)
        x = x * self.norm.double().unsqueeze(1)
        emb.copy_(x.float())


def _stress_one(
    name: str,
    factory: HeadFactory,
    device: torch.device,
    amp_dtype: torch.dtype,
    steps: int,
    batch: int,
    classes: int,
    dim: int,
    lr: float,
    reseat_every: int,
    seed: int,
    deadline: float | None,
) -> StressResult:
    res = StressResult(name, DTYPE_NAMES.get(amp_dtype, str(amp_dtype)))
    gen = torch.Generator().manual_seed(seed)
    head = factory(dim, classes).to(device).train()
    seating = _Seating(head, batch, amp_dtype, gen)
    labels = seating.labels
    emb = torch.nn.Parameter(torch.empty(batch, dim, device=device))
    params = [emb, head.weight]
    opt = torch.optim.SGD(params, lr=lr)
    chunk = max(1, math.ceil(classes / 3))  # streaming loss in three class chunks
    flags = torch.zeros(steps, len(CHECKS), dtype=torch.bool, device=device)

    def finite(*ts: Tensor) -> Tensor:
        return torch.stack([torch.isfinite(t).all() for t in ts]).all()

    for step in range(steps):
        if deadline is not None and time.monotonic() > deadline:
            res.incomplete = f"time limit reached after {step} of {steps} steps"
            flags = flags[:step]
            break
        if step % reseat_every == 0:
            seating.seat(head, emb)
        feed = emb if step % 2 == 0 else emb.to(amp_dtype)
        with torch.autocast(device.type, dtype=amp_dtype):
            logits = head(feed, labels)
            dense = head.loss(feed, labels)
            head.chunk_size = chunk
            try:
                streamed = head.loss(feed, labels)
            finally:
                head.chunk_size = None
        res.logits_dtypes.add(str(logits.dtype).removeprefix("torch."))
        g_dense = torch.autograd.grad(dense, params)
        g_stream = torch.autograd.grad(streamed, params)
        ok_dense, ok_stream = finite(*g_dense), finite(*g_stream)
        ok_grads = ok_dense & ok_stream
        with torch.no_grad():
            for p, a, b in zip(params, g_dense, g_stream, strict=True):
                # Skip the update on a non-finite step (GradScaler's rule): count, don't diverge.
                p.grad = torch.where(ok_grads, a + b, torch.zeros_like(a))
        opt.step()
        opt.zero_grad(set_to_none=True)
        flags[step] = torch.stack(
            [
                ~finite(logits.detach()),
                ~finite(dense.detach()),
                ~finite(streamed.detach()),
                ~ok_dense,
                ~ok_stream,
                ~finite(*(p.detach() for p in params)),
            ]
        )
    bad_rows = flags.any(dim=1).cpu()
    res.steps = len(bad_rows)
    res.nonfinite = int(bad_rows.sum())
    if res.nonfinite:
        res.first_bad = int(bad_rows.nonzero()[0, 0])
    for check, count in zip(CHECKS, flags.sum(dim=0).tolist(), strict=True):
        if count:
            res.failed[check] = int(count)
    return res


def stress_heads(
    heads: Mapping[str, HeadFactory] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtypes: Sequence[torch.dtype] = (torch.float16, torch.bfloat16),
    steps: int = 1000,
    batch: int = 64,
    classes: int = 256,
    dim: int = 64,
    lr: float = 0.005,
    reseat_every: int = 5,
    seed: int = 0,
    matmul_precision: str | None = None,
    cpu_threads: int | None = 1,
    deadline: float | None = None,
) -> list[StressResult]:
    """Train each head ``steps`` SGD steps at |cos| ~ 1 under each autocast dtype.

    ``heads`` maps a name to ``factory(embedding_dim, num_classes) -> MarginHead``
    (default: every head in ``lightning_metric.heads``). A dtype autocast does not support
    on ``device`` is reported as skipped, with the reason. ``matmul_precision`` sets
    ``torch.set_float32_matmul_precision`` for the run ("high": TF32 on CUDA, the case where
    a self-cosine overshoots 1 the most). On CPU the run uses ``cpu_threads`` torch threads
    (default 1: these small ops run 20-50x slower when OpenMP regions wait for busy cores).
    ``deadline`` is a ``time.monotonic()`` value; past it the current head stops early.
    """
    dev = torch.device(device)
    heads = default_heads() if heads is None else heads
    before, threads = torch.get_float32_matmul_precision(), torch.get_num_threads()
    if matmul_precision is not None:
        torch.set_float32_matmul_precision(matmul_precision)
    if dev.type == "cpu" and cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    results: list[StressResult] = []
    try:
        for dtype in dtypes:
            why = autocast_works(dev, dtype)
            for i, (name, factory) in enumerate(heads.items()):
                if why is not None:
                    results.append(
                        StressResult(name, DTYPE_NAMES.get(dtype, str(dtype)), skipped=why)
                    )
                    continue
                t0 = time.perf_counter()
                try:
                    res = _stress_one(
                        name, factory, dev, dtype, steps, batch, classes, dim, lr,
                        reseat_every, seed + i, deadline,
                    )  # fmt: skip
                except Exception as e:  # noqa: BLE001
                    res = StressResult(name, DTYPE_NAMES.get(dtype, str(dtype)))
                    res.error = f"{type(e).__name__}: {e}"
                res.seconds = time.perf_counter() - t0
                results.append(res)
    finally:
        torch.set_float32_matmul_precision(before)
        torch.set_num_threads(threads)
    return results


def stress_table(results: Sequence[StressResult]) -> list[str]:
    """Rows = heads, columns = dtypes: non-finite steps / steps, then the details."""
    dtypes = list(dict.fromkeys(r.dtype for r in results))
    names = list(dict.fromkeys(r.head for r in results))
    by = {(r.head, r.dtype): r for r in results}
    lines = [f"{'head':24}" + "".join(f"{d + ' non-finite':>24}" for d in dtypes) + "  time s"]
    lines.append("-" * len(lines[0]))
    notes: list[str] = []
    for name in names:
        row, seconds = f"{name:24}", 0.0
        for d in dtypes:
            r = by.get((name, d))
            row += f"{r.cell() if r else '-':>24}"
            if r is None:
                continue
            seconds += r.seconds
            if r.failed:
                what = ", ".join(f"{k} x{v}" for k, v in r.failed.items())
                notes.append(f"{name} {d}: non-finite {what}")
            for why in (r.error, r.incomplete):
                if why:
                    notes.append(f"{name} {d}: {why}")
        lines.append(row + f"{seconds:8.1f}")
    skipped = {r.dtype: r.skipped for r in results if r.skipped}
    notes += [f"{d} skipped: {why}" for d, why in skipped.items()]
    seen = set().union(*(r.logits_dtypes for r in results if not r.skipped)) if results else set()
    notes.append(f"logits dtype seen: {', '.join(sorted(seen)) or 'none'}")
    return lines + notes


# ------------------------------------------------------------------------ main job worker
def main_worker(cli_args: list[str]) -> dict[str, Any]:
    """Fit through ``lightning_metric.cli`` in this process; wall time, steps/s, metrics."""
    import lightning as L

    from lightning_metric.cli import main as cli_main

    class FitTimer(L.Callback):
        """Training time without validation: on_train_start..on_train_end minus val loops."""

        def __init__(self) -> None:
            self.t_start = self.t_end = self.val_start = 0.0
            self.val_time = 0.0
            self.training = False

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.training, self.t_start = True, time.perf_counter()

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.t_end = time.perf_counter()

        def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.val_start = time.perf_counter()

        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if self.training:
                self.val_time += time.perf_counter() - self.val_start

    t0 = time.perf_counter()
    cli = cli_main(cli_args, run=False)
    assert cli is not None
    trainer = cli.trainer
    timer = FitTimer()
    trainer.callbacks.append(timer)  # type: ignore[attr-defined]
    t1 = time.perf_counter()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    t2 = time.perf_counter()
    train_s = timer.t_end - timer.t_start - timer.val_time
    return {
        "wall_s": t2 - t0,
        "fit_s": t2 - t1,
        "train_s": train_s,
        "val_s": timer.val_time,
        "steps": trainer.global_step,
        "steps_per_s": trainer.global_step / train_s if train_s > 0 else float("nan"),
        "precision": str(trainer.precision),
        "accelerator": type(trainer.accelerator).__name__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "metrics": {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
        },
    }


# ----------------------------------------------------------------------------- driver
@dataclass
class Part:
    """One part's report: lines for the final summary and whether it passed."""

    name: str
    ok: bool
    lines: list[str]
    seconds: float


@dataclass
class Proc:
    rc: int | None  # None: timed out
    out: str
    err: str
    seconds: float


def run_proc(cmd: list[str], timeout: float) -> Proc:
    """Run ``cmd`` in its own session; on timeout kill the whole group (workers included)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    t0 = time.monotonic()
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True, cwd=ROOT,
    )  # fmt: skip
    try:
        out, err = p.communicate(timeout=max(1.0, timeout))
        rc: int | None = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        rc = None
    return Proc(rc, out, err, time.monotonic() - t0)


def _tail(text: str, n: int = 15) -> list[str]:
    return ["    " + line for line in text.strip().splitlines()[-n:]]


def _proc_failure(name: str, proc: Proc, timeout: float) -> list[str]:
    why = f"timed out after {timeout:.0f} s" if proc.rc is None else f"exit status {proc.rc}"
    return [f"{name} FAILED ({why}); last output:", *_tail(proc.out, 25), *_tail(proc.err, 15)]


def part_main(args: argparse.Namespace, device: str, timeout: float) -> Part:
    with tempfile.TemporaryDirectory(prefix="gpu_check_main_") as tmp:
        cli_args = [
            "--config", str(CONFIG),
            "--trainer.max_epochs=1",
            f"--trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
            f"--trainer.default_root_dir={tmp}",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp}",
            "--trainer.enable_progress_bar=false",
        ]  # fmt: skip
        if args.precision:
            cli_args.append(f"--trainer.precision={args.precision}")
        cli_args += args.main_arg
        cmd = [sys.executable, __file__, "--worker-main", json.dumps(cli_args)]
        proc = run_proc(cmd, timeout)
    found = [line for line in proc.out.splitlines() if line.startswith(RESULT_MARK)]
    if proc.rc != 0 or not found:
        return Part("main", False, _proc_failure("main job", proc, timeout), proc.seconds)
    r = json.loads(found[-1][len(RESULT_MARK) :])
    recall = r["metrics"].get("val/recall@1")
    chosen = "given by --precision" if args.precision else "the config's / run-time choice"
    lines = [
        f"main job: {CONFIG.relative_to(ROOT)}, 1 epoch on {r['device']} "
        f"({r['accelerator']}), precision {r['precision']} ({chosen})",
        f"  wall {proc.seconds:.1f} s (process, incl. imports and data), fit {r['fit_s']:.1f} s, "
        f"training {r['train_s']:.1f} s for {r['steps']} steps = {r['steps_per_s']:.1f} steps/s, "
        f"validation {r['val_s']:.1f} s",
        "  val/recall@1 = " + (f"{recall:.4f}" if recall is not None else "MISSING"),
        "  " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(r["metrics"].items())),
    ]
    ok = recall is not None and math.isfinite(recall)
    return Part("main", ok, lines, proc.seconds)


def part_stress(args: argparse.Namespace, device: str, deadline: float) -> Part:
    t0 = time.monotonic()
    cuda = device == "cuda"
    batch = args.stress_batch or (512 if cuda else 64)
    classes = args.stress_classes or (2048 if cuda else 256)
    dim = args.stress_dim or (512 if cuda else 64)
    precision = args.matmul_precision
    results = stress_heads(
        device=device, steps=args.steps, batch=batch, classes=classes, dim=dim,
        matmul_precision=precision, deadline=deadline,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    head = (
        f"margin-head stress: {args.steps} SGD steps per head and dtype at |cos| ~ 1, "
        f"B={batch} C={classes} D={dim}, {device}"
        f"{' (1 thread)' if device == 'cpu' else ''}, fp32 matmul precision '{precision}', "
        f"{seconds:.1f} s"
    )
    return Part("stress", all(r.ok for r in results), [head, *stress_table(results)], seconds)


def _part_script(name: str, cmd: list[str], timeout: float, keep: Callable[[str], bool]) -> Part:
    proc = run_proc(cmd, timeout)
    if proc.rc != 0:
        return Part(name, False, _proc_failure(Path(cmd[1]).name, proc, timeout), proc.seconds)
    shown = [str(Path(cmd[1]).relative_to(ROOT)), *cmd[2:]]
    lines = [f"python {' '.join(shlex.quote(c) for c in shown)}  ({proc.seconds:.0f} s)"]
    lines += [line for line in proc.out.splitlines() if keep(line)]
    # heads.py reports a crashed implementation in its row and still exits 0.
    ours_failed = [line for line in lines if "ours failed" in line]
    return Part(name, not ours_failed, lines, proc.seconds)


def part_knn(args: argparse.Namespace, device: str, timeout: float) -> Part:
    script = str(ROOT / "benchmarks" / "retrieval.py")
    extra = shlex.split(args.knn_args) if args.knn_args is not None else (
        [] if device == "cuda" else ["--n", "5000", "--classes", "500"]
    )  # fmt: skip
    cmd = [sys.executable, script, "--device", device, *extra]
    return _part_script("knn", cmd, timeout, lambda line: bool(line.strip()))


def part_heads(args: argparse.Namespace, device: str, timeout: float) -> Part:
    script = str(ROOT / "benchmarks" / "heads.py")
    extra = shlex.split(args.heads_args) if args.heads_args is not None else ["--rounds", "1"]
    cmd = [sys.executable, script, "--device", device, *extra]
    return _part_script("heads", cmd, timeout, lambda line: bool(line.strip()))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="auto: CUDA if present, else report that nothing was checked",
    )
    ap.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run")
    ap.add_argument("--steps", type=int, default=1000, help="stress: SGD steps per head and dtype")
    ap.add_argument("--stress-batch", type=int, help="stress batch (default 512 CUDA, 64 CPU)")
    ap.add_argument("--stress-classes", type=int, help="stress classes (2048 CUDA, 256 CPU)")
    ap.add_argument("--stress-dim", type=int, help="stress embedding dim (512 CUDA, 64 CPU)")
    ap.add_argument(
        "--matmul-precision",
        default="high",
        choices=["highest", "high", "medium"],
        help="stress: torch fp32 matmul precision (high = TF32 on CUDA)",
    )
    ap.add_argument("--precision", help="main: --trainer.precision (default: the config's)")
    ap.add_argument(
        "--main-arg",
        action="append",
        default=[],
        help="main: extra lightning-metric argument (repeatable), e.g. "
        "--main-arg=--trainer.limit_train_batches=10",
    )
    ap.add_argument("--knn-args", help="knn: arguments for retrieval.py instead of the defaults")
    ap.add_argument("--heads-args", help="heads: arguments for heads.py (default '--rounds 1')")
    ap.add_argument(
        "--time-limit",
        type=float,
        default=570.0,
        help="seconds for the whole check; a part still running then is stopped",
    )
    ap.add_argument("--worker-main", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker_main is not None:
        result = main_worker(json.loads(args.worker_main))
        print(RESULT_MARK + json.dumps(result), flush=True)
        return 0
    if args.device == "auto":
        if not torch.cuda.is_available():
            print("gpu check: no CUDA device found (torch.cuda.is_available() is False), so "
                  "nothing was checked; use --device cpu to run the parts on the CPU")  # fmt: skip
            return 0
        args.device = "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu check: --device cuda given but no CUDA device found", file=sys.stderr)
        return 2
    device: str = args.device
    start = time.monotonic()
    deadline = start + args.time_limit
    # Per-part caps so one slow or hung part leaves time for the rest (heads, last, gets it).
    caps = {"main": 240.0, "stress": 300.0, "knn": 150.0, "heads": 1e9}
    if device == "cuda":
        where = (
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
        )
    else:
        where = f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"
    print(f"gpu check on {where}: parts {' '.join(args.only)}", flush=True)
    parts: list[Part] = []
    for name in PARTS:
        if name not in args.only:
            continue
        left = deadline - time.monotonic()
        if left < 5:
            parts.append(Part(name, False, [f"{name}: not run, time limit reached"], 0.0))
            continue
        print(f"[{name}] running ...", flush=True)
        timeout = min(caps.get(name, left), left)
        try:
            if name == "main":
                part = part_main(args, device, timeout)
            elif name == "stress":
                part = part_stress(args, device, time.monotonic() + timeout)
            elif name == "knn":
                part = part_knn(args, device, timeout)
            else:
                part = part_heads(args, device, timeout)
        except Exception as e:  # noqa: BLE001
            part = Part(name, False, [f"{name} FAILED: {type(e).__name__}: {e}"], 0.0)
        print(f"[{name}] {'ok' if part.ok else 'FAILED'} ({part.seconds:.0f} s)", flush=True)
        parts.append(part)
    print(f"\n{'=' * 30} gpu check results: {where} {'=' * 30}")
    for part in parts:
        print(f"\n[{part.name}] {'ok' if part.ok else 'FAILED'}")
        for line in part.lines:
            print(line)
    failed = [p.name for p in parts if not p.ok]
    total = time.monotonic() - start
    if failed:
        print(f"\ngpu check FAILED ({', '.join(failed)}) in {total:.0f} s")
        return 1
    print(f"\ngpu check passed ({', '.join(p.name for p in parts)}) in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
