"""Every setting of a run in one `Config` dataclass, its presets, and the checks no run can pass without."""
import dataclasses
import json
import os
from dataclasses import dataclass

import torch

import cells
import data
from files import write_json

ALL_OPS = tuple(cells.OPS)


# Which runs a setting leaves alone: a resumed --search (SEARCH) or --train (TRAIN) may differ in it.
SEARCH, TRAIN = frozenset({"search"}), frozenset({"train"})
ANY = SEARCH | TRAIN


def setting(default, help, free=frozenset()):
    """A Config field: its default, its --help line, and the runs whose results it does not change."""
    return dataclasses.field(default=default, metadata={"help": help, "free": free})


@dataclass
class Config:
    """Every setting of a run, each with its --help line; the defaults are the tiny preset."""
    data: str = setting("synthetic", "'synthetic' (built-in glyphs) or a folder in a supported layout")
    image_size: int = setting(0, "side images are resized to; 0: 28 for synthetic, 84 otherwise")
    ways: int = setting(5, "N classes per episode")
    shots: int = setting(1, "K support images per class")
    queries: int = setting(5, "Q query images per class")
    blocks: int = setting(3, "B, the most blocks a cell gets", free=TRAIN)
    beam: int = setting(5, "cells scored per level after the first", free=TRAIN)
    ops: tuple = setting(ALL_OPS, "comma-separated op names the search may use", free=TRAIN)
    max_first: int = setting(12, "level 1 scores this many 1-block cells (0: all 119), and conv4: the best of the "
                             "screen, or a seeded sample without one", free=TRAIN)
    screen_iters: int = setting(10, "level 1's screen: every 1-block cell meta-trains this many iterations first, "
                                "and the best --max-first train on to --meta-iters (0, or not below --meta-iters: "
                                "no screen)", free=TRAIN)
    screen_episodes: int = setting(25, "validation episodes of level 1's screen (the first of --eval-episodes)",
                                   free=TRAIN)
    sampler: str = setting("predictor", "how each level's beam is chosen: 'predictor' (PNAS) or 'random' (the baseline)",
                           free=TRAIN)
    probe: int = setting(2, "children drawn at random and scored beside each beam, to test the predictor", free=TRAIN)
    noise: int = setting(6, "level 1's best cells scored with --noise-seeds training seeds rather than one: the mean "
                         "stands for each, and their spread is the seed noise floor", free=TRAIN)
    noise_seeds: int = setting(3, "training seeds of each of those cells (the search's own and new ones)", free=TRAIN)
    rescore: int = setting(5, "best cells scored again on fresh episodes with new seeds, beside conv4; the best of "
                           "these wins", free=TRAIN)
    rescore_seeds: int = setting(3, "new training seeds of each of those re-scores: the best by their mean wins",
                                 free=TRAIN)
    rescore_iters: int = setting(300, "meta-iterations of each re-score, the final choice's fidelity (0: --meta-iters; "
                                 "300, the tiny preset's, is --train's length)", free=TRAIN)
    max_params: int = setting(0, "children with more parameters are neither ranked nor scored (0: no budget)")
    cells: int = setting(1, "cells per stage of the network")
    channels: int = setting(32, "channels of the stem and of every cell (32: conv4's)")
    reductions: int = setting(2, "2x2 max-pools between stages, as conv4's (2: conv4's 3 stages)")
    draws: str = setting("common", "how a candidate's training draws are seeded: 'common' (every candidate of a "
                         "search the same task stream and initial weights: common random numbers) or 'own' (from "
                         "its cell, as before)",
                         free=TRAIN)
    meta_iters: int = setting(60, "meta-iterations per search candidate", free=TRAIN)
    train_iters: int = setting(300, "meta-iterations of --train", free=ANY)
    seeds: str = setting("", "--train: training seeds, e.g. 0,1,2: one run each in OUT/seed-N ('': --seed)",
                         free=SEARCH)
    meta_batch: int = setting(2, "tasks per meta-iteration (0: 4 for 1-shot, 2 otherwise)")
    inner_steps: int = setting(1, "SGD steps of adaptation while meta-training")
    test_steps: int = setting(3, "SGD steps of adaptation when evaluating")
    inner_lr: float = setting(0.1, "inner-loop (adaptation) learning rate")
    meta_lr: float = setting(3e-3, "Adam learning rate of the outer loop")
    first_order: bool = setting(True, "drop the second-order terms of the meta-gradient")
    eval_episodes: int = setting(50, "fixed episodes a candidate is scored on (val) and --eval tests on", free=TRAIN)
    val_episodes: int = setting(50, "fixed validation episodes of --train", free=SEARCH)
    val_every: int = setting(50, "--train validates and checkpoints every this many iterations", free=SEARCH)
    log_every: int = setting(20, "--train prints a progress line every this many iterations", free=ANY)
    device: str = setting("auto", "'auto' (CUDA if present), 'cpu', 'cuda' or 'cuda:N'", free=ANY)
    workers: int = setting(0, "--search: candidates trained at once, a process each (0: 1 per CPU core, 4 per GPU)",
                           free=ANY)
    threads: int = setting(0, "CPU threads per process (0: 1 for --search, as scores depend on it; else torch's)",
                           free=TRAIN)
    eval_batch: int = setting(0, "evaluation episodes adapted at once with torch.func.vmap (0: automatic; 1: none)",
                              free=TRAIN)
    wait_minutes: float = setting(60, "under torchrun: how long a process waits for another before failing", free=ANY)
    seed: int = setting(0, "seeds data, episodes, candidates and the predictor")
    out: str = setting("runs/search", "output folder (search.jsonl, best.json, ...; --draw: the .png file)", free=ANY)
    cache_dir: str = setting("", "where decoded datasets are cached ('': cache/ beside --out)", free=ANY)


PRESETS = {
    # Finishes in about 5 minutes on 2 CPU cores and finds a cell clearly above chance.
    "tiny": {},
    # The published protocols (MAML and Auto-Meta on Mini-ImageNet); the search sizes are ours. Its re-scores
    # train as long as a candidate: a final choice at --train's length is measured at the tiny preset only.
    "paper": dict(image_size=84, queries=15, blocks=5, beam=8, max_first=0, probe=4, noise=4, cells=1,
                  reductions=2, meta_iters=2000, rescore_iters=0, train_iters=60000, meta_batch=0,
                  inner_steps=5, test_steps=10, inner_lr=0.01, meta_lr=1e-3, first_order=False,
                  eval_episodes=600, val_episodes=100, val_every=1000, log_every=100),
}

def resume_free(kind):
    """The fields a resumed run of `kind` ("search" or "train") may change: they do not change its results."""
    return {f.name for f in dataclasses.fields(Config) if kind in f.metadata["free"]}


class ConfigError(ValueError):
    """A bad flag or setting; the message names the problem and the fix."""


def make_config(flags, preset=None, base=None):
    """Config from `base` (a checkpoint's settings) or the preset (default tiny), then the flags given, checked."""
    values = dict(base if base is not None else PRESETS[preset or "tiny"])
    if base is not None and values.pop("skeleton", None) != cells.SKELETON:
        raise ConfigError(f"this checkpoint was written for {cells.OLD_SKELETON}, which this version no longer "
                          "builds: train the architecture again with --train")
    if base is not None and preset:
        values.update(PRESETS[preset])
    values.update({k: v for k, v in flags.items() if k in Config.__dataclass_fields__ and v is not None})
    if isinstance(values.get("ops"), str):
        values["ops"] = tuple(o.strip() for o in values["ops"].split(",") if o.strip())
    values["ops"] = tuple(values.get("ops", ALL_OPS))
    cfg = Config(**values)
    if not cfg.image_size:
        cfg.image_size = data.default_image_size(cfg.data)
    if not cfg.meta_batch:
        cfg.meta_batch = 4 if cfg.shots == 1 else 2
    if not cfg.rescore_iters:
        cfg.rescore_iters = cfg.meta_iters
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Raise ConfigError for settings no run can use."""
    for name in ("image_size", "ways", "shots", "queries", "blocks", "beam", "cells", "channels", "screen_episodes",
                 "meta_iters", "train_iters", "meta_batch", "eval_episodes", "val_episodes", "val_every", "log_every",
                 "rescore_seeds", "noise_seeds"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} is {getattr(cfg, name)}: it must be a positive integer")
    for name in ("max_params", "reductions", "inner_steps", "test_steps", "max_first", "screen_iters", "probe", "noise",
                 "rescore", "rescore_iters", "workers", "threads", "eval_batch"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} is {getattr(cfg, name)}: it must be 0 or more")
    for name in ("inner_lr", "meta_lr", "wait_minutes"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} is {getattr(cfg, name)}: it must be a positive number")
    unknown = [o for o in cfg.ops if o not in cells.OPS]
    if unknown or not cfg.ops:
        raise ConfigError(f"--ops names unknown op(s) {', '.join(unknown) or '(none given)'}: choose from "
                          f"{', '.join(cells.OPS)}")
    if cfg.draws not in ("common", "own"):
        raise ConfigError(f"--draws is {cfg.draws!r}: use common or own")
    if cfg.sampler not in ("predictor", "random"):
        raise ConfigError(f"--sampler is {cfg.sampler!r}: use predictor or random")
    if cfg.ways < 2:
        raise ConfigError(f"--ways is {cfg.ways}: an episode needs at least 2 classes")


def train_out(arch_text):
    """--train's default --out: runs/train-NAME, NAME being the built-in's or the JSON file's name, or
    'cell' for an inline cell."""
    name = "cell" if arch_text.lstrip().startswith("[") else os.path.splitext(os.path.basename(arch_text))[0]
    return os.path.join("runs", "train-" + name)


def config_dict(cfg):
    """Config as JSON-ready data."""
    d = dataclasses.asdict(cfg)
    d["ops"] = list(cfg.ops)
    d["skeleton"] = cells.SKELETON
    return d


def check_resume(cfg, kind="search"):
    """Refuse to mix a new config into an OUT folder written by another; record the config otherwise."""
    path = os.path.join(cfg.out, "config.json")
    free = resume_free(kind)
    current = {k: v for k, v in config_dict(cfg).items() if k not in free}
    if not os.path.exists(path):
        os.makedirs(cfg.out, exist_ok=True)
        write_json(path, {"run": kind, **config_dict(cfg)})
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: delete it only if the run beside it is yours to discard, "
                          "or choose a new --out") from e
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is not a run's config (a JSON object): delete it only if the run beside it is "
                          "yours to discard, or choose a new --out")
    saved = {k: v for k, v in saved.items() if k not in free}
    if saved.pop("run", kind) != kind:
        raise ConfigError(f"{cfg.out} holds a run of another kind than --{kind}: pass a new --out")
    if saved.get("skeleton") != cells.SKELETON:
        raise ConfigError(f"{cfg.out} holds a {kind} run of {cells.OLD_SKELETON}, whose results mean other networks "
                          "in this version: pass a new --out")
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed and not set(changed) & set(saved):
        raise ConfigError(f"{cfg.out} was written by an earlier autometa, which had no {', '.join(changed)} "
                          "setting(s): pass a new --out to search with this version")
    if changed:
        raise ConfigError(f"{cfg.out} holds a {kind} run with different settings ({', '.join(changed)}): "
                          f"rerun with the same flags to resume it, or pass a new --out to start fresh")


def pick_device(name):
    """'auto' -> CUDA when present, else CPU; a CUDA device this machine does not have is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from e
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name} is not supported: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but this machine has no CUDA GPU: use --device cpu")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.index is not None and device.index >= gpus:
        raise ConfigError(f"--device {name} names GPU {device.index}, but this machine has {gpus} "
                          f"(cuda:0 to cuda:{gpus - 1}): pass one of those, or cuda")
    return device


WORKERS_PER_GPU = 4  # a default-search candidate fills a fraction of a GPU


def default_workers(cfg, device):
    """--workers 0: one single-thread worker per CPU core this process may use, or WORKERS_PER_GPU per GPU."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device.type == "cuda":
        gpus = 1 if device.index is not None else torch.cuda.device_count()
        return max(1, min(WORKERS_PER_GPU * gpus, cores))
    return max(1, cores // max(cfg.threads, 1))


def config_flags(cfg):
    """The command-line flags that give `cfg` back, every field spelt out (what another process is started with)."""
    flags = []
    for name, value in config_dict(cfg).items():
        if name == "skeleton":
            continue
        if name == "first_order":
            flags.append("--first-order" if value else "--second-order")
        else:
            flags += ["--" + name.replace("_", "-"), ",".join(value) if isinstance(value, list) else str(value)]
    return flags
