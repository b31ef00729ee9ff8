"""--bench: seconds per MAML meta-step with the command line's speed-ups ("ours") and without ("loop"),
and the default search's candidates per minute with one worker and with its default number.

Without speed-ups, maml.py adapts one task at a time, each inner step an ``autograd.grad(create_graph=True)``
on the task's own fast weights: the per-task loop that learn2learn and higher run. "Ours" is what
speedups.py chooses: fastcpu.py on a CPU, every task of the meta-batch at once (batched.py) on a GPU. It
counts their operations too, each a kernel launch or more on a GPU.
Both are timed in one process on the same task batch, interleaved, and compared on their
meta-gradients. On CPU every workload is timed twice: first with glibc's default allocator (a fresh
process, as those libraries run), then after ``fastcpu.reuse_freed_memory()`` (as autometa.py runs),
which speeds up both. Run it as

    python autometa.py --bench conv4 --preset paper    # MAML's conv4 on the Mini-ImageNet workload
    python autometa.py --bench cell                    # the Auto-Meta cell at the default search's size
    python autometa.py --bench search                  # candidates per minute, 1 worker and --workers 0
    python autometa.py --bench overhead                # loop and batched where arithmetic is next to nothing
"""
import contextlib
import copy
import dataclasses
import functools
import os
import resource
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import batched
import cells
import data
import fastcpu
import maml
import pnas
import speedups
import team
from config import default_workers
from scoring import build_model, make_scorer

METHODS = ("ours", "loop")
REPEATS = 5  # timed meta-steps per method, workload and allocator (after one warm-up step); medians are reported
CANDIDATE_ITERS, CANDIDATE_EPISODES = 10, 20  # the timed search candidate; the full one is extrapolated
SEARCH_TIMED = 8  # first-level cells of the search timed with 1 worker and with the default, after one untimed each
SEARCH_ROUNDS = 2  # times each setting scores them, alternating


def method(name, model, first_order):
    """The Speedups of `name`: what the command line runs ("ours", speedups.py) or maml.py as written ("loop")."""
    return speedups.choose(model, first_order) if name == "ours" else speedups.PLAIN


def synchronize(device):
    """Wait for queued GPU work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_methods(model, tasks, steps, lr, meta_lr, first_order, repeats, device):
    """Median seconds per meta-step of every method, timed interleaved on copies of `model`."""
    runs = {}
    for name in METHODS:
        m = copy.deepcopy(model)
        fast = method(name, m, first_order)
        batch = fast.layout(tasks)  # the layout check runs once, here, not in the timed steps
        optimizer = torch.optim.Adam(m.parameters(), lr=meta_lr)
        runs[name] = functools.partial(maml.meta_step, m, optimizer, batch, steps, lr, first_order, fast.meta_loss)
    return alternating_medians(runs, device, repeats)


def alternating_medians(runs, device, repeats):
    """{name: median wall-clock seconds} of runs (name -> function), called in turn `repeats` times, the order
    reversed every other round so that neither always runs first."""
    seconds = {name: [] for name in runs}
    for r in range(repeats + 1):  # round 0 warms up (allocations, the vmap check) and is not counted
        for name in (list(runs) if r % 2 else list(runs)[::-1]):
            synchronize(device)
            start = time.perf_counter()
            runs[name]()
            synchronize(device)
            if r > 0:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def meta_gradient(meta_loss, model, params, tasks, steps, lr, first_order):
    """The gradient of meta_loss(...) w.r.t. `params`."""
    return torch.autograd.grad(meta_loss(model, params, tasks, steps, lr, first_order)[0], list(params.values()))


def meta_gradients(model, tasks, steps, lr, first_order):
    """The meta-gradient of every method at the same weights: name -> list of tensors."""
    grads = {}
    for name in METHODS:
        params = dict(model.named_parameters())
        fast = method(name, model, first_order)
        grads[name] = meta_gradient(fast.meta_loss, model, params, fast.layout(tasks), steps, lr, first_order)
    return grads


def gradient_check(model, tasks, steps, lr, first_order):
    """Largest meta-gradient differences on the batch's first task: ours vs loop in float32 and in float64,
    and the loop's own float32 rounding (float32 loop vs float64 loop), with the largest gradient entry."""
    one = tuple(t[:1] for t in tasks)
    g32 = meta_gradients(model, one, steps, lr, first_order)
    g64 = meta_gradients(copy.deepcopy(model).double(), tuple(t.double() if t.is_floating_point() else t for t in one),
                         steps, lr, first_order)

    def gap(a, b):
        return max((x - y).abs().max().item() for x, y in zip(a, b))

    return dict(gap32=gap(g32["ours"], g32["loop"]), gap64=gap(g64["ours"], g64["loop"]),
                rounding=gap(g32["loop"], g64["loop"]), scale=max(g.abs().max().item() for g in g64["loop"]))


def peak_memory(name, model, tasks, steps, lr, first_order, device):
    """Peak bytes of tensors alive during one meta-loss forward and backward, above what was alive before."""
    params = dict(model.named_parameters())

    fast = method(name, model, first_order)
    batch = fast.layout(tasks)

    def forward_backward():
        meta_gradient(fast.meta_loss, model, params, batch, steps, lr, first_order)

    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        forward_backward()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # On CPU the profiler records each allocation (on the op that made it) and each free, in time order.
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        forward_backward()
    alive = peak = 0
    for _, change in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                            if e.self_cpu_memory_usage):
        alive += change
        peak = max(peak, alive)
    return peak


class OperationCounter(TorchDispatchMode):
    """Counts the ATen operations run within it that compute something; views, which only relabel memory,
    are left out. On a GPU each of them launches a kernel or more."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func is torch.ops.aten._unsafe_view.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def operations(meta_loss, model, params, tasks, steps, lr, first_order):
    """The operations that meta_loss(...) and its gradient w.r.t. `params` run: the same count on every device."""
    with OperationCounter() as counter:
        meta_gradient(meta_loss, model, params, tasks, steps, lr, first_order)
    return counter.count


def operation_counts(model, tasks, steps, lr, first_order):
    """The per-task loop's operations per meta-gradient against the batched meta-loss's, in words."""
    params = dict(model.named_parameters())
    loop = operations(maml.meta_loss, model, params, tasks, steps, lr, first_order)
    if not batched.runs(model, params, tasks):
        return f"{loop} in the per-task loop; vmap cannot run this network"
    together = operations(batched.meta_loss, model, params, tasks, steps, lr, first_order)
    return f"{loop} in the per-task loop, {together} with all tasks at once (loop / batched {loop / together:.2f}x)"


@contextlib.contextmanager
def quiet_stderr():
    """Drop what C++ code writes to file descriptor 2 meanwhile (the profiler logs its start and stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def workloads(cfg, which, device):
    """[(title, model, first_order)] for `which` ('all', 'conv4' or 'cell'), built from `cfg`."""
    found = []
    if which in ("all", "conv4"):
        torch.manual_seed(cfg.seed)
        conv4 = build_model(cfg, cells.CONV4_CELL).to(device)
        found += [("conv4, second order", conv4, False), ("conv4, first order", conv4, True)]
    if which in ("all", "cell"):
        torch.manual_seed(cfg.seed)
        network = build_model(cfg, cells.AUTOMETA_CELL).to(device)
        found.append((f"autometa cell, {'first' if cfg.first_order else 'second'} order", network, cfg.first_order))
    return found


def allocators(device):
    """The allocator settings to time under, in order: on CPU glibc's default first, as switching back is not possible."""
    return ["default", "reused"] if device.type == "cpu" else ["cuda caching"]


def time_workloads(jobs, tasks, cfg, device):
    """{(title, allocator): {method: seconds per meta-step}} for every workload under each allocator; a row each."""
    print(f"{'seconds per meta-step':27s} {'allocator':9s} {'ours':>8s} {'loop':>8s} {'loop/ours':>9s}")
    seconds = {}
    for allocator in allocators(device):
        if allocator == "reused" and not fastcpu.reuse_freed_memory():
            print("(this C library has no mallopt: memory reuse not timed)")
            break
        for title, model, first_order in jobs:
            t = time_methods(model, tasks, cfg.inner_steps, cfg.inner_lr, cfg.meta_lr, first_order, REPEATS, device)
            seconds[title, allocator] = t
            print(f"{title:27s} {allocator:9s} {t['ours']:7.3f}s {t['loop']:7.3f}s {t['loop'] / t['ours']:8.2f}x",
                  flush=True)
    if any(allocator == "reused" for _, allocator in seconds):
        print("ours with memory reused, against the loop in a default process (as other libraries run):")
        for title, _, _ in jobs:
            ours, loop = seconds[title, "reused"]["ours"], seconds[title, "default"]["loop"]
            print(f"  {title:27s} {loop:.3f}s / {ours:.3f}s = {loop / ours:.2f}x")
    return seconds


def check_workloads(jobs, tasks, cfg, device):
    """Print the peak tensor memory and the meta-gradient check of every workload."""
    steps, lr = cfg.inner_steps, cfg.inner_lr
    for title, model, first_order in jobs:
        memory = {name: peak_memory(name, model, tasks, steps, lr, first_order, device) for name in METHODS}
        check = gradient_check(model, tasks, steps, lr, first_order)
        print(f"{title}: peak tensor memory {memory['ours'] / 2**20:.0f} MiB ours, {memory['loop'] / 2**20:.0f} MiB "
              f"loop ({cells.count_parameters(model)} parameters)")
        print(f"  meta-gradient, first task: max |ours - loop| {check['gap32']:.1e} in float32, {check['gap64']:.1e} "
              f"in float64; the loop's own float32 rounding {check['rounding']:.1e} (max |g| {check['scale']:.1e})",
              flush=True)
        counts = operation_counts(model, tasks, steps, lr, first_order)
        print(f"  operations per meta-gradient (a GPU kernel or more each): {counts}", flush=True)
    if device.type == "cpu":
        print(f"process peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")


def run(cfg, splits, device, which="all"):
    """The --bench command: time, check and measure `which` workloads under the settings in `cfg`."""
    sampler = data.EpisodeSampler(splits["train"], cfg.ways, cfg.shots, cfg.queries, cfg.seed)
    tasks = maml.to_device(sampler.sample(cfg.meta_batch), device)
    print(f"bench: {cfg.ways}-way {cfg.shots}-shot, {cfg.queries} queries, {cfg.image_size}x{cfg.image_size} "
          f"images ({cfg.data}), meta-batch {cfg.meta_batch}, {cfg.inner_steps} inner steps of lr {cfg.inner_lr}, "
          f"Adam; device {device}, {torch.get_num_threads()} threads; medians of {REPEATS} meta-steps")
    if which not in ("search", "overhead"):
        jobs = workloads(cfg, which, device)
        seconds = time_workloads(jobs, tasks, cfg, device)
        check_workloads(jobs, tasks, cfg, device)
        rate = sampler_rate(sampler, cfg.meta_batch)
        print(f"episode sampler: {rate * cfg.meta_batch:.0f} episodes/s ({1000 / rate:.1f} ms per batch of "
              f"{cfg.meta_batch})")
    if which in ("all", "cell"):
        time_candidate(cfg, splits, device, seconds)
    if which in ("all", "search"):
        time_search(cfg, splits, device)
    if which in ("all", "overhead"):
        time_overhead(cfg, device)


def sampler_rate(sampler, meta_batch, seconds=1.0):
    """Task batches per second that `sampler` delivers, over about `seconds`."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sampler.sample(meta_batch)
        count += 1
    return count / (time.perf_counter() - start)


def time_candidate(cfg, splits, device, seconds):
    """Time one search candidate (the autometa cell) end to end, shortened, and scale it to `cfg`'s length."""
    short = dataclasses.replace(cfg, meta_iters=CANDIDATE_ITERS, eval_episodes=CANDIDATE_EPISODES)
    score = make_scorer(short, splits, device)
    start = time.perf_counter()
    result = score(cells.AUTOMETA_CELL)
    elapsed = time.perf_counter() - start
    print(f"search candidate (autometa cell), {CANDIDATE_ITERS} meta-iterations + {CANDIDATE_EPISODES} validation "
          f"episodes end to end: {elapsed:.1f} s (accuracy {100 * result['accuracy']:.1f}%)")
    # Scale up: the meta-steps at their measured time, the rest (mostly evaluation) with the episode count.
    step = [t["ours"] for (title, _), t in seconds.items() if title.startswith("autometa cell")][-1]
    rest = max(elapsed - CANDIDATE_ITERS * step, 0.0) * cfg.eval_episodes / CANDIDATE_EPISODES
    print(f"  so about {(cfg.meta_iters * step + rest) / 60:.1f} min for this config's {cfg.meta_iters} "
          f"meta-iterations and {cfg.eval_episodes} validation episodes")


def time_overhead(cfg, device, repeats=REPEATS):
    """Operations and seconds per meta-gradient of the per-task loop and of the batched meta-loss, for
    meta-batches of 2 and 4 (the presets'), on networks too narrow for their arithmetic to count (2 channels;
    2-way 1-shot tasks with one query), with the config's inner steps and lr: what launching and dispatching
    operations costs, which is what a GPU spends its time on at these sizes."""
    steps, lr = cfg.inner_steps, cfg.inner_lr
    print(f"where arithmetic is next to nothing (2 channels, 2-way 1-shot, 1 query, {steps} inner steps; medians of "
          f"{repeats}, alternating; device {device}):")
    print(f"  {'network':13s} {'order':6s} {'tasks':>5s} {'loop ops':>9s} {'loop':>9s} {'batched ops':>11s} "
          f"{'batched':>9s} {'loop/batched':>12s}")
    for title, arch, size in (("conv4", cells.CONV4_CELL, 16), ("autometa cell", cells.AUTOMETA_CELL, 16)):
        for first_order in (False, True):
            for count in (2, 4):
                torch.manual_seed(0)
                model = cells.build_network(arch, 2, size, channels=2, reductions=2).to(device)
                params = dict(model.named_parameters())
                g = torch.Generator().manual_seed(0)
                images = [torch.rand(count, 2, 3, size, size, generator=g) for _ in range(2)]
                labels = torch.arange(2).repeat(count, 1)
                tasks = maml.to_device((images[0], labels, images[1], labels), device)
                losses = {"loop": maml.meta_loss, "batched": batched.meta_loss}
                ops = {name: operations(f, model, params, tasks, steps, lr, first_order) for name, f in losses.items()}
                seconds = alternating_medians({name: functools.partial(
                    meta_gradient, f, model, params, tasks, steps, lr, first_order) for name, f in losses.items()},
                    device, repeats)
                print(f"  {title:13s} {'first' if first_order else 'second':6s} {count:5d} {ops['loop']:9d} "
                      f"{1e3 * seconds['loop']:7.1f}ms {ops['batched']:11d} {1e3 * seconds['batched']:7.1f}ms "
                      f"{seconds['loop'] / seconds['batched']:11.2f}x", flush=True)


def time_search(cfg, splits, device):
    """Print the search's candidates per minute with one worker and with --workers 0 (its default), on the
    same seeded sample of its first-level cells, each process at the search's threads (--threads, 1).
    On a CPU with several cores, one worker on all of them (torch's default threads: the search before
    --workers) is timed too. The settings alternate SEARCH_ROUNDS times in one team, so that a machine whose
    load drifts slows all alike: rank 0 scores the cells alone while the other workers wait, then with them."""
    cfg = dataclasses.replace(cfg, threads=cfg.threads or 1)
    workers = cfg.workers or default_workers(cfg, device)
    timed = pnas.first_level(cfg.ops, SEARCH_TIMED, cfg.seed)  # the same cells whatever the settings
    warm = [cell for cell in pnas.first_level(cfg.ops) if cell not in timed][:workers]
    all_threads = torch.get_num_threads() if device.type == "cpu" else cfg.threads
    settings = {"1 worker": (1, cfg.threads)}
    if all_threads != cfg.threads:
        settings[f"1 worker on {all_threads} threads (the search before --workers)"] = (1, all_threads)
    if workers > 1:
        settings[f"{workers} workers ({'--workers' if cfg.workers else 'the default here'})"] = (workers, cfg.threads)
    print(f"search candidates ({cfg.meta_iters} meta-iterations and {cfg.eval_episodes} validation episodes each; "
          f"{len(timed)} timed after a first one per worker; {cfg.threads} thread(s) per worker unless said, "
          f"device {device}):")
    fastcpu.reuse_freed_memory()  # as in a search process
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        if workers == 1:
            rates = alternate(None, cfg, splits, device, warm, timed, settings)
        else:
            rates = team.run_workers(cfg, workers, lead=lambda cfg, device, job: alternate(job, cfg, splits, device,
                                                                                           warm, timed, settings))
    finally:
        torch.set_num_threads(before)
    base = statistics.median(rates["1 worker"])
    for name, rate in rates.items():
        ratio = "" if name == "1 worker" else f", {statistics.median(rate) / base:.2f}x"
        print(f"  {name}: {statistics.median(rate):.2f} candidates/min (median of "
              f"{', '.join(f'{r:.2f}' for r in rate)}){ratio}")


def alternate(job, cfg, splits, device, warm, timed, settings):
    """As rank 0 (of a --workers team `job`, or alone with None): once every worker has scored a first cell,
    the rates of `timed` under each of `settings` (name -> (workers, threads)), in turn SEARCH_ROUNDS times,
    the order reversed every other round; then dismiss the team. Returns {name: [candidates per minute]}."""
    if job is not None:
        job.barrier()  # starts the other workers
    score = make_scorer(cfg, splits, device)
    if job is not None:
        job.wait_until_serving()
    list((job.score_all if job is not None else pnas.score_each)(score, warm))
    rates = {name: [] for name in settings}
    for r in range(SEARCH_ROUNDS):
        for name in (list(settings) if r % 2 == 0 else list(settings)[::-1]):
            workers, threads = settings[name]
            torch.set_num_threads(threads)
            rates[name].append(level_rate(score, pnas.score_each if workers == 1 else job.score_all, timed))
    if job is not None:
        job.dismiss()
    return rates


def level_rate(score, score_cells, cells):
    """Candidates per minute of score_cells(score, cells)."""
    start = time.perf_counter()
    failed = [result for _, result in score_cells(score, cells) if result["status"] == "failed"]
    seconds = time.perf_counter() - start
    if failed:
        raise pnas.SearchError(f"a timed candidate failed ({failed[0]['error']})")
    return 60 * len(cells) / seconds
