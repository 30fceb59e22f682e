"""What the CKD layer loss costs, and how much of it is the linear combiner's matrix product:

    python bench/layer_loss.py [--tokens 4096] [--d-student 256] [--d-teacher 256] [--group 4] [--layers 2]
                               [--threads 2] [--repeats 20]

Forward and backward, under bf16 autocast as in training, of (1) the whole chain per student layer (the
`linear` combiner: W h_S into the concatenated group, the parameter-free layer norms of both sides, the MSE),
(2) the teacher side alone (its layer norms and the concatenation; no gradient), (3) the projection W h_S alone
(one product forward, two backward). Random tensors of the CPU sizes by default (a 4,096-token batch,
configs/student-cpu.yaml's encoder groups {1,2,3,4},{3,4,5,6}); medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from combinekd.combiners import LinearCombiner, normalize
from combinekd.losses import layer_loss


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-student", type=int, default=256)
    ap.add_argument("--d-teacher", type=int, default=256)
    ap.add_argument("--group", type=int, default=4, help="teacher layers combined per student layer")
    ap.add_argument("--layers", type=int, default=2, help="student layers with a layer loss")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, d_s, d_t, k = args.tokens, args.d_student, args.d_teacher, args.group
    mask = torch.ones(1, n, dtype=torch.bool)
    combiners = [LinearCombiner(k, d_t, d_s) for _ in range(args.layers)]
    teachers = [[torch.randn(1, n, d_t).bfloat16() for _ in range(k)] for _ in range(args.layers)]
    students = [torch.randn(1, n, d_s, requires_grad=True) for _ in range(args.layers)]

    def backward(make_loss):
        def run():
            with torch.autocast("cpu", torch.bfloat16):
                loss = make_loss()
            loss.backward()
        return run

    chain = backward(lambda: sum(layer_loss(*c(h.bfloat16(), t), mask, "mse")
                                 for c, h, t in zip(combiners, students, teachers)))
    projection = backward(lambda: sum(c.project(h.bfloat16()).float().mean() for c, h in zip(combiners, students)))

    def teacher_side():
        with torch.no_grad():
            for t in teachers:
                torch.cat([normalize(x, d_t) for x in t], dim=-1)

    whole, side, product = (median_seconds(fn, args.repeats) for fn in (chain, teacher_side, projection))
    flop = 3 * 2 * n * d_s * k * d_t * args.layers  # one product forward, two backward
    print(f"{args.layers} student layers x group {k}: {n} tokens, d_S {d_s} -> {k} x d_T {d_t}, "
          f"bf16 autocast, threads {args.threads}")
    for name, s in (("whole chain (forward + backward)", whole), ("teacher side (layer norms, concatenation)", side),
                    ("projection W h_S (forward + backward)", product)):
        print(f"  {name:44s} {s * 1000:7.1f} ms")
    print(f"  projection: {flop / 1e9:.1f} GFLOP, {flop / product / 1e9:.0f} GFLOP/s; its share of the chain "
          f"{product / whole:.0%}")


if __name__ == "__main__":
    main()
