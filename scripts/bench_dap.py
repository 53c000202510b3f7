"""Forward + backward time and peak memory of the DAP objective (histogram kernel, the default;
the exact chunked formula, `exact=True`; a naive dense float64 implementation of the paper's
formula) against the pairwise Smooth-AP relaxation, as the number of candidates M grows.

    python scripts/bench_dap.py                      # CPU, M = 1e3 .. 1e7
    python scripts/bench_dap.py --device cuda        # on a GPU

Each (method, M) point runs in a fresh subprocess; the CPU peak is the peak resident set (VmHWM,
restarted once the inputs exist) beyond the resident set at that moment (Linux);
on CUDA the peak is torch.cuda.max_memory_allocated. Prints a Markdown table, the growth exponent
b of time ~ M^b fitted on the points with M >= 1e4, and, where the naive version runs, how far the
default path is from it: |DAP difference| and the cosine similarity of the two gradients (with
respect to scores and IoUs together).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import time

import torch


def _inputs(m: int, device: str):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(m, generator=g).to(device).requires_grad_(True)
    positive = (torch.rand(m, generator=g) < min(0.5, 2000 / m)).to(device)
    ious = (torch.rand(m, generator=g) * 0.5 + 0.5).to(device).requires_grad_(True)
    return scores, positive, ious, int(positive.sum()) + 1


def naive_dap(scores, positive, ious, num_gt, sigma: float = 0.05, num_bins: int = 256):
    """Eq. 7, 11, 6 and 12 written out densely in float64, (M x N) tensors and all: the reference
    an implementation that takes no shortcut would be."""
    s, iou = scores.double(), ious.double()
    x = torch.arange(num_bins, dtype=torch.float64, device=s.device) / num_bins
    tail = 1 - torch.distributions.Normal(s[:, None], sigma).cdf(x[None, :])
    tail = torch.cat([torch.ones_like(tail[:, :1]), tail[:, 1:]], 1)  # bin 0 reaches -inf
    alphas = torch.linspace(0.5, 0.95, 10, dtype=torch.float64, device=s.device)
    tp = (positive[:, None] & (iou.detach()[:, None] >= alphas[None, :])).double().T @ tail  # (K, N)
    total = tail.sum(0)
    precision = torch.where(total > 0, tp / total, 0.0).cummax(-1).values
    cum = precision.cumsum(0)
    y = torch.cat([torch.zeros_like(cum[:1]), cum, 2 * cum[-1:] - cum[-2:-1]])  # (K+2, N) anchors
    mass = tail - torch.cat([tail[:, 1:], torch.zeros_like(tail[:, :1])], 1)
    anchors = torch.cat([alphas.new_zeros(1), alphas, alphas.new_ones(1)])
    p_iou = iou[positive].clamp(0, 1)
    seg = (torch.searchsorted(anchors, p_iou.detach(), right=True) - 1).clamp(0, len(alphas))
    t = (p_iou - anchors[seg]) / (anchors[seg + 1] - anchors[seg])
    l_int = (1 - t)[:, None] * y[seg] + t[:, None] * y[seg + 1]  # (P, N)
    return (l_int * mass[positive]).sum() / (len(alphas) * num_gt)


def _loss(method: str, scores, positive, ious, num_gt):
    from dapft import differentiable_ap
    from dapft.objective.smooth_ap import smooth_ap

    if method == "dap":
        return 1 - differentiable_ap(scores, positive, ious, num_gt)
    if method == "exact":
        return 1 - differentiable_ap(scores, positive, ious, num_gt, exact=True)
    if method == "naive":
        return 1 - naive_dap(scores, positive, ious, num_gt)
    return 1 - smooth_ap(scores, positive, tau=0.01)


def _measure(method: str, m: int, device: str, repeats: int, queue) -> None:
    import dapft.objective.smooth_ap  # noqa: F401  (imports are not the method's memory)

    scores, positive, ious, num_gt = _inputs(m, device)

    def step():
        _loss(method, scores, positive, ious, num_gt).backward()
        scores.grad = ious.grad = None

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = _reset_peak_rss()
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
    else:  # the peak resident set once the inputs exist, beyond what it was then, in MiB
        peak = (_status_kib("VmHWM") - rss_before) / 1024
    queue.put({"ms": 1000 * sorted(times)[len(times) // 2], "peak_mib": peak})


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss() -> int:
    """Restart the kernel's peak-RSS counter (VmHWM) at the current RSS, which it returns (KiB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def agreement(m: int, device: str) -> dict:
    """|DAP - naive DAP| and the cosine similarity of their gradients, on the benchmark's inputs."""
    values, grads = [], []
    for method in ("dap", "naive"):
        scores, positive, ious, num_gt = _inputs(m, device)
        loss = _loss(method, scores, positive, ious, num_gt)
        loss.backward()
        values.append(float(loss.detach()))
        grads.append(torch.cat([scores.grad, ious.grad]).double())
    cos = float(torch.nn.functional.cosine_similarity(grads[0], grads[1], 0))
    return {"abs_diff": abs(values[0] - values[1]), "grad_cosine": cos}


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
    ap.add_argument("--sizes", default="1000,10000,100000,200000,1000000,10000000")
    ap.add_argument("--exact-max", type=int, default=1_000_000, help="largest M for the exact O(M x N) path")
    ap.add_argument("--naive-max", type=int, default=200_000,
                    help="largest M for the naive dense float64 version (2 GiB of M x N tensors at 2e5)")
    ap.add_argument("--smooth-ap-max", type=int, default=10000,
                    help="largest M for the O(M^2) Smooth-AP (1e4 needs ~4 GiB of M x M temporaries)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    limits = {"dap": max(sizes), "exact": args.exact_max, "naive": args.naive_max, "smooth_ap": args.smooth_ap_max}

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    print(f"device: {args.device} ({device_name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("sigma=0.05, N=256 bins, 10 IoU thresholds; time = median of forward+backward; peak = memory beyond "
          "the inputs; DAP = the default (histogram kernel); naive = dense float64 formula\n")
    print("| M | DAP ms | DAP peak MiB | exact ms | exact peak MiB | naive f64 ms | naive / DAP "
          "| |DAP - naive| | grad cosine | Smooth-AP ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows, points = [], {k: [] for k in limits}
    for m in sizes:
        row = {"m": m}
        for method, limit in limits.items():
            row[method] = run_point(method, m, args.device, args.repeats) if m <= limit else None
            if row[method]:
                points[method].append((m, row[method]["ms"]))
        row["agreement"] = agreement(m, args.device) if m <= args.naive_max else None
        rows.append(row)
        cell = lambda r, k, f="{:.1f}": f.format(r[k]) if r else "—"  # noqa: E731
        ratio = f"{row['naive']['ms'] / row['dap']['ms']:.0f}x" if row["naive"] and row["dap"] else "—"
        agree = row["agreement"]
        print(f"| {m:,} | {cell(row['dap'], 'ms')} | {cell(row['dap'], 'peak_mib')} | {cell(row['exact'], 'ms')} "
              f"| {cell(row['exact'], 'peak_mib')} | {cell(row['naive'], 'ms')} | {ratio} "
              f"| {cell(agree, 'abs_diff', '{:.1e}')} | {cell(agree, 'grad_cosine', '{:.6f}')} "
              f"| {cell(row['smooth_ap'], 'ms')} |", flush=True)
    print()
    for method, pts in points.items():
        big = [p for p in pts if p[0] >= 10000]
        if len(big) >= 2:
            print(f"{method} time growth exponent (M >= 1e4): {fit_exponent(big):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "device_name": device_name, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
