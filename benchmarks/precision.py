"""Training-step time of the main job's model in fp32 and bf16 autocast, on this CPU as it is
and capped to AVX2 (how most laptops and cloud CPUs run it: no AVX512_BF16, no AMX).

    python benchmarks/precision.py                 # both ISA settings, 2 threads
    python benchmarks/precision.py --steps 20 --isa avx2

Each (ISA, precision) runs in its own process, because the caps (``ONEDNN_MAX_CPU_ISA``,
``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``) are read when torch loads. The model is
the main job's (``examples/configs/glyphs_arcface.yaml``): SmallCNN(width=32) -> 128-d neck ->
ArcFace over 1,400 classes, AdamW, batch 128 of 1x32x32 images. Reported: median seconds per
step after warm-up, bf16 / fp32 time ratio, and the precision the CLI picks in that setting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CAPS = {
    "native": {},
    "avx2": {
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    },
}


def measure(precision: str, steps: int, warmup: int, threads: int) -> dict:
    import torch

    from lightning_metric import EmbeddingNeck, SmallCNN
    from lightning_metric.heads import ArcFaceHead
    from lightning_metric.precision import default_precision

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    backbone = SmallCNN(in_channels=1, width=32)
    model = torch.nn.ModuleDict(
        {
            "backbone": backbone,
            "neck": EmbeddingNeck(backbone.num_features, 128),
            "head": ArcFaceHead(128, 1400, scale=30.0, margin=0.3),
        }
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.rand(128, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1400, (128,))
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            embeddings = model["neck"](model["backbone"](x))
        model["head"].loss(embeddings, labels).backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "default": default_precision("cpu")[0]}


def run(isa: str, precision: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, **CAPS[isa]}
    cmd = [
        sys.executable,
        __file__,
        "--child",
        precision,
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--threads={args.threads}",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--isa", nargs="+", default=list(CAPS), choices=list(CAPS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.warmup, args.threads)))
        return
    print(f"steps={args.steps} warmup={args.warmup} threads={args.threads} batch=128")
    print(
        f"{'ISA':8s} {'fp32 s/step':>12s} {'bf16 s/step':>12s} {'bf16/fp32':>10s} {'CLI picks':>11s}"
    )
    for isa in args.isa:
        fp32, bf16 = run(isa, "32-true", args), run(isa, "bf16-mixed", args)
        ratio = bf16["seconds"] / fp32["seconds"]
        print(
            f"{isa:8s} {fp32['seconds']:12.3f} {bf16['seconds']:12.3f} {ratio:9.2f}x "
            f"{fp32['default']:>11s}"
        )


if __name__ == "__main__":
    main()
