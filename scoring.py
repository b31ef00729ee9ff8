"""The search's objective: meta-train a candidate cell from scratch with MAML, then score it by its
few-shot accuracy on fixed validation episodes."""
import hashlib
import math
import os

import torch

import cells
import data
import maml
import pnas
import speedups
from files import save_torch


def build_model(cfg, arch):
    """The network for a cell (cells.CONV4_CELL: conv4) under this config."""
    return cells.build_network(arch, cfg.ways, cfg.image_size, cfg.channels, cfg.cells, cfg.reductions)


def parameters(cfg, arch):
    """Parameters of build_model(cfg, arch), counted without building it."""
    return cells.parameter_count(arch, cfg.ways, cfg.image_size, cfg.channels, cfg.cells, cfg.reductions)


def within_budget(cfg):
    """allowed(cell) for pnas.search: whether the cell's network has at most --max-params parameters (None: no budget)."""
    if not cfg.max_params:
        return None
    return lambda cell: parameters(cfg, cell) <= cfg.max_params


def candidates_dir(cfg):
    """Where a search with a level-1 screen keeps each screened cell's training, so that the cells it keeps
    train on from there (None: no screen)."""
    screened = 0 < cfg.screen_iters < cfg.meta_iters and cfg.max_first
    return os.path.join(cfg.out, "candidates") if screened else None


FRESH_EPISODES = 3  # seed offset of the validation episodes that re-score the best cells (--train uses 1 and 2)


def candidate_seed(seed, cell, trial=0, draws="common"):
    """A candidate's training seed. With common draws (common random numbers) it comes from (global seed,
    trial) alone, so every cell of a search meta-trains on the same task stream from the same initial
    draws, and two cells' scores differ by their ops rather than by their luck; with draws "own", from
    (global seed, network, trial). Either way a score never depends on search order or workers. Trial 0
    is the search's own score; a re-score with other training seeds takes trials 1, 2, ..."""
    name = f"{seed}" + (f":{pnas.cell_key(cell)}" if draws == "own" else "") + (f":{trial}" if trial else "")
    return stable_seed(name)


def stable_seed(name):
    """A 31-bit seed from a string, the same in every process and Python version."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def draw_weights(model, seed):
    """Draw each layer's initial weights from (seed, the layer's name) alone, so that two networks of one
    seed start from the same weights wherever their layers coincide (the stem, a shared op, the head when
    its width is the same), whatever else they hold."""
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is not None and hasattr(module, "reset_parameters"):
            torch.manual_seed(stable_seed(f"{seed}:{name}"))
            module.reset_parameters()
    torch.manual_seed(seed)


def make_scorer(cfg, splits, device, keep=None):
    """score(cell, trial=0, fresh=False, meta_iters=None, episodes=None) -> {"accuracy", "ci95", "params",
    "seed", "meta_iters"}, or status "diverged" when training blew up. `cell` is canonical (pnas.canonical), as
    every cell of the search is: its listing fixes the order in which the network's weights are drawn.

    Every candidate is meta-trained from its seed (candidate_seed) for `meta_iters` (default
    cfg.meta_iters: the objective's fidelity) iterations on training episodes, then adapted and tested on
    the same cfg.eval_episodes validation episodes (with fresh=True: other validation episodes, the same
    for every cell, to re-score the best ones); `episodes` takes the first of them only (a screen's). With
    `keep`, a folder, a candidate's training is kept there when it was scored below cfg.meta_iters (a
    screen), and a later score of the same cell and trial at more meta-iterations trains on from it
    rather than from scratch: successive halving's promotion, with the same result either way.
    On a GPU, an error that leaves it unusable raises pnas.SearchError, which ends the search.
    """
    def episodes(offset):
        return data.fixed_episodes(splits["val"], cfg.ways, cfg.shots, cfg.queries, cfg.eval_episodes,
                                   seed=cfg.seed + offset, batch=cfg.meta_batch)

    search_episodes, fresh_episodes = episodes(0), episodes(FRESH_EPISODES)

    def score(cell, trial=0, fresh=False, meta_iters=None, episodes=None):
        seed = candidate_seed(cfg.seed, cell, trial, cfg.draws)
        state = None if keep is None else os.path.join(keep, f"{seed}-{stable_seed(pnas.cell_key(cell)):08x}.pt")
        if device.type == "cuda":
            torch.cuda.empty_cache()  # start clean: no blocks cached by an earlier candidate, which may have run out
        try:
            chosen = fresh_episodes if fresh else search_episodes
            if episodes:  # the first of them, a batch of cfg.meta_batch at a time
                chosen = [chosen[i] for i in range(min(math.ceil(episodes / cfg.meta_batch), len(chosen)))]
            return train_and_score(cfg, splits, device, cell, seed, chosen, meta_iters or cfg.meta_iters, state)
        except Exception as e:
            if device.type == "cuda" and not isinstance(e, torch.OutOfMemoryError) and gpu_lost(device):
                raise pnas.SearchError(f"{device} hit a CUDA error that leaves it unusable in this process "
                                       f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); every result so "
                                       f"far is in {cfg.out}/search.jsonl: rerun the same command to resume") from e
            raise

    return score


def train_and_score(cfg, splits, device, cell, seed, episodes, meta_iters, state=None):
    """Meta-train a network of `cell` from `seed` for `meta_iters` iterations, then score it on `episodes`
    (see make_scorer). `state`: a file to train on from, when it holds fewer iterations, and to keep the
    training in afterwards."""
    torch.manual_seed(seed)
    model = build_model(cfg, cell)
    if cfg.draws == "common":
        draw_weights(model, seed)
    model = model.to(device)
    sampler = data.EpisodeSampler(splits["train"], cfg.ways, cfg.shots, cfg.queries, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.meta_lr)
    start = restore(state, model, optimizer, sampler, meta_iters) if state else 0
    try:
        fast = speedups.choose(model, cfg.first_order, cfg.eval_batch)
        maml.meta_train(model, optimizer, lambda: fast.layout(sampler.sample(cfg.meta_batch)), meta_iters,
                        cfg.inner_steps, cfg.inner_lr, cfg.first_order, start=start, meta_loss=fast.meta_loss)
        if state and meta_iters < cfg.meta_iters:  # a screen: the cells it keeps train on from here
            save(state, model, optimizer, sampler, meta_iters)
        accuracy, ci95 = maml.evaluate(model, dict(model.named_parameters()), map(fast.layout, episodes),
                                       cfg.test_steps, cfg.inner_lr, fast.per_episode)
    except maml.Diverged as e:
        return dict(accuracy=None, ci95=None, status="diverged", error=str(e), seed=seed, meta_iters=meta_iters)
    return {"accuracy": round(accuracy, 5), "ci95": round(ci95, 5), "params": cells.count_parameters(model),
            "seed": seed, "meta_iters": meta_iters}


def restore(path, model, optimizer, sampler, meta_iters):
    """Load a candidate's kept training (weights, optimizer, task stream) from `path` when it holds at most
    `meta_iters` iterations; returns the iteration to go on from (0: none kept, or more than asked)."""
    if not os.path.exists(path):
        return 0
    state = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
    if state["iteration"] > meta_iters:
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    sampler.rng.bit_generator.state = state["sampler"]
    return state["iteration"]


def save(path, model, optimizer, sampler, iteration):
    """Keep a candidate's training at `iteration` in `path`, written atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_torch(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "sampler": sampler.rng.bit_generator.state, "iteration": iteration})


def gpu_lost(device):
    """Whether a CUDA error has left this process's context on `device` unusable (a "sticky" error such as an
    illegal memory access): then every later CUDA call fails too, and only a new process clears it."""
    try:
        torch.ones(1, device=device).add_(1).cpu()  # waits for the GPU, so it reports any pending error
    except RuntimeError:
        return True
    return False
