"""Every setting of a run in one `Config` dataclass, its presets, and the checks no run can pass without."""
import dataclasses
import inspect
import json
import os
import re
from dataclasses import dataclass

import torch

import cells
import data
from files import write_json

ALL_OPS = tuple(cells.OPS)


@dataclass
class Config:
    """Every setting of a run, one comment each (--help shows it); the defaults are the tiny preset."""
    data: str = "synthetic"      # 'synthetic' (built-in glyphs) or a folder in a supported layout
    image_size: int = 0          # side images are resized to; 0: 28 for synthetic, 84 otherwise
    ways: int = 5                # N classes per episode
    shots: int = 1               # K support images per class
    queries: int = 5             # Q query images per class
    blocks: int = 3              # B, the most blocks a cell gets
    beam: int = 5                # cells scored per level after the first
    ops: tuple = ALL_OPS         # comma-separated op names the search may use
    max_first: int = 12          # score a seeded sample of this many 1-block cells (0: all 119), and conv4's
    sampler: str = "predictor"   # how each level's beam is chosen: 'predictor' (PNAS) or 'random' (the baseline)
    probe: int = 2               # children drawn at random and scored beside each beam, to test the predictor
    noise: int = 4               # level-1 cells scored again with another seed, for the seed noise floor
    rescore: int = 3             # best cells scored again on fresh episodes with new seeds; the best of these wins
    rescore_seeds: int = 2       # new training seeds of each of those re-scores
    max_params: int = 0          # children with more parameters are neither ranked nor scored (0: no budget)
    cells: int = 1               # cells per stage of the network
    channels: int = 32           # channels of the stem and of every cell (32: conv4's)
    reductions: int = 2          # 2x2 max-pools between stages, as conv4's (2: conv4's 3 stages)
    meta_iters: int = 60         # meta-iterations per search candidate
    train_iters: int = 300       # meta-iterations of --train
    seeds: str = ""              # --train: training seeds, e.g. 0,1,2: one run each in OUT/seed-N ('': --seed)
    meta_batch: int = 2          # tasks per meta-iteration (0: 4 for 1-shot, 2 otherwise)
    inner_steps: int = 1         # SGD steps of adaptation while meta-training
    test_steps: int = 3          # SGD steps of adaptation when evaluating
    inner_lr: float = 0.1        # inner-loop (adaptation) learning rate
    meta_lr: float = 3e-3        # Adam learning rate of the outer loop
    first_order: bool = True     # drop the second-order terms of the meta-gradient
    eval_episodes: int = 50      # fixed episodes a candidate is scored on (val) and --eval tests on
    val_episodes: int = 50       # fixed validation episodes of --train
    val_every: int = 50          # --train validates and checkpoints every this many iterations
    log_every: int = 20          # --train prints a progress line every this many iterations
    device: str = "auto"         # 'auto' (CUDA if present), 'cpu', 'cuda' or 'cuda:N'
    workers: int = 0             # --search: candidates trained at once, a process each (0: 1 per CPU core, 4 per GPU)
    threads: int = 0             # CPU threads per process (0: 1 for --search, as scores depend on it; else torch's)
    eval_batch: int = 0          # evaluation episodes adapted at once with torch.func.vmap (0: automatic; 1: none)
    wait_minutes: float = 60     # under torchrun: how long a process waits for another before failing
    seed: int = 0                # seeds data, episodes, candidates and the predictor
    out: str = "runs/search"     # output folder (search.jsonl, best.json, ...; --draw: the .png file)
    cache_dir: str = ""          # where decoded datasets are cached ('': cache/ beside --out)


def field_help():
    """name -> the comment beside each Config field above, so that a field is documented in one place."""
    return dict(re.findall(r"^\s+(\w+): [^#\n]*# (.*)$", inspect.getsource(Config), re.MULTILINE))


PRESETS = {
    # Finishes in about 5 minutes on 2 CPU cores and finds a cell clearly above chance.
    "tiny": {},
    # The published protocols (MAML and Auto-Meta on Mini-ImageNet); the search sizes are ours.
    "paper": dict(image_size=84, queries=15, blocks=5, beam=8, max_first=0, probe=4, noise=4, cells=1,
                  reductions=2, meta_iters=2000, train_iters=60000, meta_batch=0,
                  inner_steps=5, test_steps=10, inner_lr=0.01, meta_lr=1e-3, first_order=False,
                  eval_episodes=600, val_episodes=100, val_every=1000, log_every=100),
}

# Fields that do not change a run's results, so a resumed run may differ in them.
RESUME_FREE = {
    "search": {"device", "out", "cache_dir", "wait_minutes", "train_iters", "val_episodes", "val_every", "log_every",
               "seeds", "workers"},
    "train": {"device", "workers", "threads", "eval_batch", "out", "cache_dir", "wait_minutes", "train_iters",
              "eval_episodes", "log_every",
              "blocks", "beam", "ops", "max_first", "meta_iters", "sampler", "probe", "noise", "rescore",
              "rescore_seeds"},
}


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
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Raise ConfigError for settings no run can use."""
    for name in ("image_size", "ways", "shots", "queries", "blocks", "beam", "cells", "channels",
                 "meta_iters", "train_iters", "meta_batch", "eval_episodes", "val_episodes", "val_every", "log_every",
                 "rescore_seeds"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} is {getattr(cfg, name)}: it must be a positive integer")
    for name in ("max_params", "reductions", "inner_steps", "test_steps", "max_first", "probe", "noise", "rescore", "workers",
                 "threads", "eval_batch"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} is {getattr(cfg, name)}: it must be 0 or more")
    for name in ("inner_lr", "meta_lr", "wait_minutes"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} is {getattr(cfg, name)}: it must be a positive number")
    unknown = [o for o in cfg.ops if o not in cells.OPS]
    if unknown or not cfg.ops:
        raise ConfigError(f"--ops names unknown op(s) {', '.join(unknown) or '(none given)'}: choose from "
                          f"{', '.join(cells.OPS)}")
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
    free = RESUME_FREE[kind]
    current = {k: v for k, v in config_dict(cfg).items() if k not in free}
    if not os.path.exists(path):
        os.makedirs(cfg.out, exist_ok=True)
        write_json(path, {"run": kind, **config_dict(cfg)})
        return
    try:
        with open(path) as f:
            saved = {k: v for k, v in json.load(f).items() if k not in free}
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: delete it only if the run beside it is yours to discard, "
                          "or choose a new --out") from e
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
