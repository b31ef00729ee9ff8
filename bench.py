"""Benchmark: seconds per MAML meta-step of maml.py against the per-task loop other libraries use.

learn2learn and higher adapt one task at a time, each inner step an
``autograd.grad(create_graph=True)`` on the task's own copy of the weights; ``reference_meta_loss``
below is that loop, written out. Both are timed in one process on the same task batch,
interleaved, and compared on their meta-gradients. Run it through the command line:

    python autometa.py --bench --preset paper     # the Mini-ImageNet workload (README.md, Speed)
"""
import contextlib
import copy
import dataclasses
import os
import sys
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.profiler import ProfilerActivity, profile

import cells
import data
import maml

REPEATS = 5       # timed meta-steps per method and workload (after one warm-up step each); medians are reported
CELL_REPEATS = 3  # the same for the (much larger) cell network
CANDIDATE_ITERS, CANDIDATE_EPISODES = 10, 20  # the timed search candidate; the full one is extrapolated


def reference_meta_loss(model, params, tasks, steps, lr, first_order=False):
    """MAML as learn2learn and higher run it: one task at a time, autograd.grad(create_graph=True)."""
    xs, ys, xq, yq = tasks
    losses = []
    for t in range(xs.shape[0]):
        fast = params
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (xs[t],)), ys[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {name: p - lr * g for (name, p), g in zip(fast.items(), grads)}
        losses.append(F.cross_entropy(functional_call(model, fast, (xq[t],)), yq[t]))
    return torch.stack(losses).mean(), None


def ours_meta_loss(model, params, tasks, steps, lr, first_order=False):
    """The project's meta-loss (maml.meta_loss), under the same signature as the reference."""
    return maml.meta_loss(model, params, tasks, steps, lr, first_order)


METHODS = {"ours": ours_meta_loss, "per-task loop": reference_meta_loss}


def synchronize(device):
    """Wait for queued GPU work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def meta_step(loss_fn, model, optimizer, tasks, steps, lr, first_order):
    """One outer update (forward, backward, Adam step) with `loss_fn`, as maml.meta_step does it."""
    loss, _ = loss_fn(model, dict(model.named_parameters()), tasks, steps, lr, first_order)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_methods(model, tasks, steps, lr, meta_lr, first_order, repeats, device):
    """Median seconds per meta-step of every method, timed interleaved on copies of `model`."""
    runs = {}
    for name in METHODS:
        m = copy.deepcopy(model)
        runs[name] = (m, torch.optim.Adam(m.parameters(), lr=meta_lr), [])
    for r in range(repeats + 1):  # round 0 warms up (allocations, layout checks) and is not counted
        for name in (METHODS if r % 2 else reversed(METHODS)):  # alternate the order: neither always runs first
            m, optimizer, seconds = runs[name]
            synchronize(device)
            start = time.perf_counter()
            meta_step(METHODS[name], m, optimizer, tasks, steps, lr, first_order)
            synchronize(device)
            if r > 0:
                seconds.append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, (_, _, seconds) in runs.items()}


def meta_gradients(model, tasks, steps, lr, first_order):
    """The meta-gradient of every method at the same weights: name -> list of tensors."""
    grads = {}
    for name, loss_fn in METHODS.items():
        params = dict(model.named_parameters())
        loss, _ = loss_fn(model, params, tasks, steps, lr, first_order)
        grads[name] = torch.autograd.grad(loss, list(params.values()))
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

    return dict(gap32=gap(g32["ours"], g32["per-task loop"]), gap64=gap(g64["ours"], g64["per-task loop"]),
                rounding=gap(g32["per-task loop"], g64["per-task loop"]),
                scale=max(g.abs().max().item() for g in g64["per-task loop"]))


def peak_memory(loss_fn, model, tasks, steps, lr, first_order, device):
    """Peak bytes of tensors alive during one meta-loss forward and backward, above what was alive before."""
    params = dict(model.named_parameters())
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss, _ = loss_fn(model, params, tasks, steps, lr, first_order)
        torch.autograd.grad(loss, list(params.values()))
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # On CPU the profiler records each allocation (on the op that made it) and each free, in time order.
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = loss_fn(model, params, tasks, steps, lr, first_order)
        torch.autograd.grad(loss, list(params.values()))
    alive = peak = 0
    for _, change in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                            if e.self_cpu_memory_usage):
        alive += change
        peak = max(peak, alive)
    return peak


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


def compare(title, model, tasks, steps, lr, meta_lr, first_order, repeats, device):
    """Time, check and measure one workload; print one line and return its figures."""
    seconds = time_methods(model, tasks, steps, lr, meta_lr, first_order, repeats, device)
    memory = {name: peak_memory(fn, model, tasks, steps, lr, first_order, device) for name, fn in METHODS.items()}
    ours, loop = seconds["ours"], seconds["per-task loop"]
    print(f"{title:28s} {ours:7.3f} s {loop:9.3f} s {loop / ours:7.2f}x   "
          f"{memory['ours'] / 2**20:9.0f} / {memory['per-task loop'] / 2**20:.0f} MiB", flush=True)
    check = gradient_check(model, tasks, steps, lr, first_order)
    print(f"  meta-gradient, first task: max |ours - loop| {check['gap32']:.1e} in float32, {check['gap64']:.1e} in "
          f"float64; the loop's own float32 rounding {check['rounding']:.1e} (max |g| {check['scale']:.1e})", flush=True)
    return dict(ours=ours, loop=loop, memory=memory, **check)


def sampler_rate(sampler, meta_batch, seconds=1.0):
    """Task batches per second that `sampler` delivers, over about `seconds`."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sampler.sample(meta_batch)
        count += 1
    return count / (time.perf_counter() - start)


def run(cfg, splits, device, make_scorer):
    """The --bench command: every workload of README.md's Speed section, under the settings in `cfg`."""
    sampler = data.EpisodeSampler(splits["train"], cfg.ways, cfg.shots, cfg.queries, cfg.seed)
    tasks = maml.to_device(sampler.sample(cfg.meta_batch), device)
    print(f"bench: {cfg.ways}-way {cfg.shots}-shot, {cfg.queries} queries, {cfg.image_size}x{cfg.image_size} "
          f"images ({cfg.data}), meta-batch {cfg.meta_batch}, {cfg.inner_steps} inner steps of lr {cfg.inner_lr}, "
          f"Adam; device {device}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"{'seconds per meta-step':28s} {'ours':>9s} {'per-task loop':>11s} {'loop/ours':>8s}   "
          f"peak tensor memory ours / loop")
    torch.manual_seed(cfg.seed)
    conv4 = cells.build_network("conv4", cfg.ways, cfg.image_size).to(device)
    torch.manual_seed(cfg.seed)
    network = cells.build_network(cells.AUTOMETA_CELL, cfg.ways, cfg.image_size, cfg.channels, cfg.cells,
                                  cfg.reductions, cfg.stem_stride).to(device)
    order = "first" if cfg.first_order else "second"
    common = (tasks, cfg.inner_steps, cfg.inner_lr, cfg.meta_lr)
    compare("conv4, second order", conv4, *common, False, REPEATS, device)
    compare("conv4, first order", conv4, *common, True, REPEATS, device)
    cell = compare(f"autometa cell, {order} order", network, *common, cfg.first_order, CELL_REPEATS, device)
    print(f"(autometa cell network: {cells.count_parameters(network)} parameters, {cfg.channels} channels, "
          f"{cfg.reductions} reductions, stem stride {cfg.stem_stride})")

    rate = sampler_rate(sampler, cfg.meta_batch)
    print(f"episode sampler: {rate:.0f} task batches/s ({rate * cfg.meta_batch:.0f} tasks/s), "
          f"{1000 / rate:.1f} ms per batch of {cfg.meta_batch}")

    short = dataclasses.replace(cfg, meta_iters=CANDIDATE_ITERS, eval_episodes=CANDIDATE_EPISODES)
    score = make_scorer(short, splits, device)
    start = time.perf_counter()
    result = score(cells.AUTOMETA_CELL)
    elapsed = time.perf_counter() - start
    print(f"search candidate (autometa cell), {CANDIDATE_ITERS} meta-iterations + {CANDIDATE_EPISODES} validation "
          f"episodes end to end: {elapsed:.1f} s (accuracy {100 * result['accuracy']:.1f}%)")
    # Scale up: the meta-steps at their measured time, the rest (mostly evaluation) with the episode count.
    training = CANDIDATE_ITERS * cell["ours"]
    rest = max(elapsed - training, 0.0) * cfg.eval_episodes / CANDIDATE_EPISODES
    print(f"  so about {(cfg.meta_iters * cell['ours'] + rest) / 60:.1f} min for this config's {cfg.meta_iters} "
          f"meta-iterations and {cfg.eval_episodes} validation episodes")
