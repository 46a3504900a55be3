"""Seconds per sample of SegResNet on the CPU, one sample a pass against a batch (issue 15, the demo).

    .venv/bin/python -m bench.cpu_batch [--threads 2] [--repeats 4]

PyTorch picks oneDNN for a CPU 3-D convolution only past a size rule (batch > 1, or batch x channels x
the first two spatial sizes > 20480, among others); below it, it runs its own much slower kernel. A
small window of one sample falls below it in most layers. This measures a training step (forward,
backward, AdamW) and an inference pass for the demo's and the benchmark's window sizes, batch 1, 2, 4,
and prints a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SHAPES = ((32, 24, 32), (48, 48, 48), (64, 64, 64), (96, 96, 96))
BATCHES = (1, 2, 4)


def seconds_per_pass(run, repeats: int) -> float:
    run()  # warm-up: oneDNN builds its kernels on first use
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> int:
    import torch

    from lib.networks import build_network
    from lib.trainers.segmentation import fine_tuning_optimizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES), help="windows, e.g. 32x24x32,48x48x48")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes, the first two compared")
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_network("segresnet")
    optimizer = fine_tuning_optimizer(net)  # the train task's

    def train_step(x):
        optimizer.zero_grad()
        net(x)[:, :9].sigmoid().mean().backward()
        optimizer.step()

    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| window | pass | " + " | ".join(f"batch {b}" for b in batches) + f" | batch {batches[1]} vs {batches[0]}, per sample |")
    print("|---|---|" + "---|" * len(batches) + "---|")
    for shape in shapes:
        for kind in ("train step", "inference"):
            if kind == "train step" and shape[0] > 64:
                continue  # 96^3 training is not what the CPU configurations do
            per_sample = []
            for batch in batches:
                x = torch.rand(batch, 1, *shape)
                if kind == "train step":
                    net.train()
                    seconds = seconds_per_pass(lambda: train_step(x), args.repeats)
                else:
                    net.eval()
                    with torch.no_grad():
                        seconds = seconds_per_pass(lambda: net(x), args.repeats)
                per_sample.append(seconds / batch)
            cells = " | ".join(f"{s:.3f} s" for s in per_sample)
            print(f"| {'x'.join(map(str, shape))} | {kind} | {cells} | {per_sample[0] / per_sample[1]:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
