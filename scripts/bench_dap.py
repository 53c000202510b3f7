"""Forward + backward time and peak memory of the DAP objective against the pairwise Smooth-AP
relaxation, as the number of candidates M grows.

    python scripts/bench_dap.py                      # CPU, M = 1e3 .. 1e6
    python scripts/bench_dap.py --device cuda        # on a GPU

Each (method, M) point runs in a fresh subprocess so that the CPU peak (max RSS growth) is its own;
on CUDA the peak is torch.cuda.max_memory_allocated. Prints a Markdown table and the growth exponent
b of time ~ M^b fitted on the points with M >= 1e4.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import resource
import time

import torch


def _inputs(m: int, device: str):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(m, generator=g).to(device).requires_grad_(True)
    positive = (torch.rand(m, generator=g) < min(0.5, 2000 / m)).to(device)
    ious = (torch.rand(m, generator=g) * 0.5 + 0.5).to(device).requires_grad_(True)
    return scores, positive, ious, int(positive.sum()) + 1


def _measure(method: str, m: int, device: str, repeats: int, queue) -> None:
    from dapft import differentiable_ap
    from dapft.smooth_ap import smooth_ap

    torch.set_num_threads(torch.get_num_threads())
    scores, positive, ious, num_gt = _inputs(m, device)

    def step():
        if method == "dap":
            loss = 1 - differentiable_ap(scores, positive, ious, num_gt)
        else:
            loss = 1 - smooth_ap(scores, positive, tau=0.01)
        loss.backward()
        scores.grad = ious.grad = None

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:  # growth of the max RSS once the inputs exist, in MiB
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    queue.put({"ms": 1000 * sorted(times)[len(times) // 2], "peak_mib": peak})


def run_point(method: str, m: int, device: str, repeats: int) -> dict | None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(method, m, device, repeats, queue))
    proc.start()
    proc.join()
    return queue.get() if proc.exitcode == 0 and not queue.empty() else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]}, {len(names)} cores"
    except (OSError, IndexError):
        return platform.processor() or "cpu"


def fit_exponent(points: list[tuple[int, float]]) -> float:
    xs = [math.log(m) for m, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="1000,3000,10000,30000,100000,300000,1000000")
    ap.add_argument("--smooth-ap-max", type=int, default=10000,
                    help="largest M for the O(M^2) Smooth-AP (1e4 needs ~4 GiB of M x M temporaries)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    print(f"device: {args.device} ({device_name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("sigma=0.05, N=256 bins, 10 IoU thresholds; time = median of forward+backward; peak = memory beyond the inputs\n")
    print("| M | DAP ms | DAP peak MiB | Smooth-AP ms | Smooth-AP peak MiB |")
    print("|---:|---:|---:|---:|---:|")
    rows, dap_points, sap_points = [], [], []
    for m in sizes:
        dap = run_point("dap", m, args.device, args.repeats)
        sap = run_point("smooth_ap", m, args.device, args.repeats) if m <= args.smooth_ap_max else None
        if dap:
            dap_points.append((m, dap["ms"]))
        if sap:
            sap_points.append((m, sap["ms"]))
        cell = lambda r, k: f"{r[k]:.1f}" if r else "—"  # noqa: E731
        print(f"| {m:,} | {cell(dap, 'ms')} | {cell(dap, 'peak_mib')} | {cell(sap, 'ms')} | {cell(sap, 'peak_mib')} |",
              flush=True)
        rows.append({"m": m, "dap": dap, "smooth_ap": sap})
    big = [p for p in dap_points if p[0] >= 10000]
    sap_big = [p for p in sap_points if p[0] >= 1000]
    print()
    if len(big) >= 2:
        print(f"DAP time growth exponent (M >= 1e4): {fit_exponent(big):.2f}")
    if len(sap_big) >= 2:
        print(f"Smooth-AP time growth exponent (M >= 1e3): {fit_exponent(sap_big):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "device_name": device_name, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
