"""Benchmark: vectorised `select_group` against the authors' loop-style grouping (CPU, float32).

    cd /work/main && .venv/bin/python benchmarks/grouping_select.py            # full, < 5 min on 2 cores
    cd /work/main && .venv/bin/python benchmarks/grouping_select.py --quick    # < 30 s

What is compared, on the same inputs in one run:
- "vec":  dtvg_scale.method.selection.select_group (one K x K similarity matrix, cumulative sums, no
  host sync). Median of several timed calls after warm-up (time.perf_counter).
- "loop": the default decision written the way the authors' code
  (zpy2477/DTVG, peft/soft_prompt_controller.py, ablation 0) computes it: a Python loop over the
  sources for s_k, a stable descending sort of the Python list, then for every ranked prefix a
  double loop over ordered pairs i != j calling `similarity` on the two [r, d] task vectors and
  `.item()` on each result, KC as the mean of that list, first argmax. The inputs are already
  scaled (the authors also re-multiply the scales inside the pair loop; that extra work is left
  out here, so the loop is, if anything, flattered).

The loop makes K + sum_{m=2..n} m(m-1) = K + (n-1)n(n+1)/3 `similarity` calls (n = number of
candidates; the data below make every source a candidate, the worst case the code allows).
When the estimated full loop time exceeds the budget, the loop is NOT run to the end: stage 1
(all K target similarities) runs in full, then a fixed number of pair calls of the LARGEST prefix
(m = n, which touches every source, so its cache behaviour is that of the expensive prefixes) is
timed, and the total is extrapolated as  t_stage1 + (time per pair call) * (number of pair calls).
Such rows are marked "~" (extrapolated) and have no mask comparison. In the full run one size
that is run completely is also extrapolated the same way, and both numbers are printed, so the
estimator can be checked against a measurement.

Timings on a shared machine are noisy: every row prints how much CPU other processes used
while it ran ('other%'); `--threads N` pins torch's thread count (default: torch's own).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dtvg_scale.method.selection import select_group

R = 100  # prompt length (rows of a task vector)


def similarity(a, b):
    """The authors' similarity of two [r, d] task vectors, one pair per call, as their loop calls
    it: the baseline measured here (the package computes every pair at once: ``mean_dot``)."""
    return (a.mean(dim=-2) * b.mean(dim=-2)).mean(dim=-1)


# ------------------------------------------------------------------------------------------
# the loop version (authors' semantics, default decision: threshold 0, KC only, no cap)
# ------------------------------------------------------------------------------------------
def loop_stage1(target_tv, source_tvs, threshold=0.0):
    """s_k one source at a time; returns (sims, ranked candidate list)."""
    sims = []
    num_pos = 0
    for k in range(source_tvs.shape[0]):
        s = similarity(target_tv, source_tvs[k]).item()
        sims.append(s)
        if s >= threshold:
            num_pos += 1
    pi = sorted(range(len(sims)), key=lambda x: sims[x], reverse=True)  # stable
    return sims, pi[:num_pos]


class LoopTimeout(Exception):
    pass


def loop_select_group(target_tv, source_tvs, threshold=0.0, deadline=None):
    """The whole loop decision; returns a bool mask [K] in the sources' order.
    `deadline` (a time.perf_counter() value) only guards the benchmark's wall time."""
    _, rank_list = loop_stage1(target_tv, source_tvs, threshold)
    kcs = [0.0]
    for last in range(1, len(rank_list)):
        intra = []
        for id_i in rank_list[: last + 1]:
            for id_j in rank_list[: last + 1]:
                if id_i != id_j:
                    intra.append(similarity(source_tvs[id_i], source_tvs[id_j]).item())
            if deadline is not None and time.perf_counter() > deadline:
                raise LoopTimeout
        kcs.append(sum(intra) / len(intra))
    best = max(range(len(kcs)), key=lambda m: (kcs[m], -m)) + 1  # first maximum
    selected = set(rank_list[:best]) if rank_list else set()
    mask = torch.zeros(source_tvs.shape[0], dtype=torch.bool)
    for k in selected:
        mask[k] = True
    return mask


def time_pair_calls(source_tvs, rank_list, max_calls):
    """Time up to `max_calls` pair similarity calls of the largest prefix (m = len(rank_list)),
    exactly as the loop does them. Returns (seconds, calls)."""
    calls = 0
    intra = []
    t0 = time.perf_counter()
    for id_i in rank_list:
        for id_j in rank_list:
            if id_i != id_j:
                intra.append(similarity(source_tvs[id_i], source_tvs[id_j]).item())
                calls += 1
                if calls >= max_calls:
                    return time.perf_counter() - t0, calls
    return time.perf_counter() - t0, calls


def num_pair_calls(n: int) -> int:
    return (n - 1) * n * (n + 1) // 3  # sum_{m=2..n} m(m-1)


def timed_stage1(target_tv, source_tvs):
    t0 = time.perf_counter()
    _, rank_list = loop_stage1(target_tv, source_tvs)
    return time.perf_counter() - t0, rank_list


def extrapolate_loop_seconds(t_stage1, source_tvs, rank_list, sample_calls):
    """Stage 1 measured in full; pair calls sampled on the largest prefix; extrapolated."""
    n = len(rank_list)
    if n < 2:
        return t_stage1
    t_pairs, calls = time_pair_calls(source_tvs, rank_list, sample_calls)
    return t_stage1 + t_pairs / calls * num_pair_calls(n)


# ------------------------------------------------------------------------------------------
# data and timing
# ------------------------------------------------------------------------------------------
def make_task_vectors(K: int, d: int, seed: int = 0):
    """Target [R, d] and sources [K, R, d], float32. Every source shares a direction with the
    target, with a source-specific strength, so all K are candidates (the loop's worst case) and
    the KC curve has clear, non-tied values."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(d, generator=g)
    strength = torch.rand(K, generator=g) * 0.8 + 0.2
    sources = torch.randn(K, R, d, generator=g).mul_(0.5)
    sources.add_(strength[:, None, None] * shared)
    target = torch.randn(R, d, generator=g).mul_(0.5).add_(shared)
    return target, sources


def time_vectorised(target, sources, warmup: int, min_runs: int, min_seconds: float):
    for _ in range(warmup):
        mask = select_group(target, sources)
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < 50):
        t0 = time.perf_counter()
        mask = select_group(target, sources)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times), mask


class OtherLoad:
    """CPU time used by OTHER processes over an interval (/proc/stat busy time minus this
    process's CPU time), as a percentage of all cores; None where /proc/stat is missing."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), time.process_time()

    @staticmethod
    def _busy():
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def percent(self):
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        wall = (time.perf_counter() - self.t0) * (os.cpu_count() or 1)
        others = (busy - self.busy0) - (time.process_time() - self.own0)
        return max(0.0, 100.0 * others / wall) if wall > 0 else None


def fmt_pct(p) -> str:
    return "?" if p is None else f"{p:.0f}"


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:,.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 30 s")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: leave torch's default)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.quick:
        configs = [(6, 2048), (32, 2048), (128, 2048), (32, 768)]
        loop_budget_s = 3.0  # run the loop to the end if it should take less than this
        sample_calls = 200
        warmup, min_runs, min_seconds = 1, 5, 0.3
        check_k = None
    else:
        configs = [(6, 2048), (32, 2048), (128, 2048), (256, 2048), (1024, 2048),
                   (32, 768), (256, 768), (32, 4096), (256, 4096)]
        loop_budget_s = 20.0
        sample_calls = 1000
        warmup, min_runs, min_seconds = 2, 7, 1.0
        check_k = (32, 2048)  # run in full AND extrapolated, to check the estimator

    probe = OtherLoad()
    time.sleep(1.0)
    idle_load = probe.percent()
    print(f"# grouping_select ({'quick' if args.quick else 'full'}): torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}, CPU used by other "
          f"processes just before the run: {'?' if idle_load is None else f'{idle_load:.0f}%'}")
    print("# 'other%' = share of all cores used by OTHER processes while that row ran; well above 0 "
          "means the timings of that row are inflated and noisy (threads contend)")
    print(f"# r={R}, float32, CPU; vec = median of timed runs after warm-up; "
          f"loop = 1 full run (median of 3 if short), or '~' = extrapolated from stage 1 + {sample_calls} timed pair calls "
          f"of the largest prefix (full loop would exceed {loop_budget_s:.0f} s; no mask check)")
    header = f"{'K':>5} {'d':>5} {'cand':>5} {'group':>5} {'vec ms':>9} {'runs':>4} {'loop ms':>12} {'loop/vec':>10} {'masks':>6} {'other%':>6}"
    print(header)
    print("-" * len(header))

    notes = []
    t_start = time.perf_counter()
    for K, d in configs:
        target, sources = make_task_vectors(K, d)
        row_load = OtherLoad()
        t_vec, runs, mask = time_vectorised(target, sources, warmup, min_runs, min_seconds)

        # estimate first (stage 1 + a few pair calls), then run the loop to the end only if
        # that fits the budget; otherwise time more pair calls and extrapolate.
        t_stage1, rank_list = timed_stage1(target, sources)
        n = len(rank_list)
        t_est = extrapolate_loop_seconds(t_stage1, sources, rank_list, min(sample_calls, 100))
        loop_str = None
        if t_est <= loop_budget_s:
            repeats = 3 if t_est < 0.3 else 1
            loop_times = []
            try:
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    loop_mask = loop_select_group(target, sources, deadline=t0 + 3 * loop_budget_s)
                    loop_times.append(time.perf_counter() - t0)
            except LoopTimeout:  # the machine got slower than the estimate said: extrapolate
                notes.append(f"K={K}, d={d}: full loop aborted after {3 * loop_budget_s:.0f} s "
                             f"(estimate was {t_est:.1f} s); extrapolated instead")
            else:
                t_loop = statistics.median(loop_times)
                loop_str = fmt_ms(t_loop)
                agree = "yes" if torch.equal(loop_mask, mask) else "NO"
                if (K, d) == check_k:
                    t_s1, ranks = timed_stage1(target, sources)
                    t_chk = extrapolate_loop_seconds(t_s1, sources, ranks, sample_calls)
                    notes.append(f"estimator check at K={K}, d={d}: extrapolated {fmt_ms(t_chk)} ms, "
                                 f"measured {fmt_ms(t_loop)} ms (ratio {t_chk / t_loop:.2f})")
        if loop_str is None:
            t_loop = extrapolate_loop_seconds(t_stage1, sources, rank_list, sample_calls)
            loop_str = "~" + fmt_ms(t_loop)
            agree = "n/a"
        ratio = t_loop / t_vec
        print(f"{K:>5} {d:>5} {n:>5} {int(mask.sum()):>5} {fmt_ms(t_vec):>9} {runs:>4} "
              f"{loop_str:>12} {ratio:>10,.0f} {agree:>6} {fmt_pct(row_load.percent()):>6}", flush=True)
        del target, sources

    for note in notes:
        print("# " + note)
    print(f"# similarity calls made by the loop for n candidates: K + (n-1)n(n+1)/3, "
          f"e.g. n=1024: {1024 + num_pair_calls(1024):,}")
    print(f"# total wall time {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
