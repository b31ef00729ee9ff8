"""Auto-Meta: progressive architecture search for a MAML meta-learner (Kim et al., 2018).

Commands (see README.md for the figures they produce):

    python autometa.py --search                       # tiny search on the built-in synthetic glyphs
    python autometa.py --search --device cuda --preset paper --data PATH --out runs/paper
    python autometa.py --data PATH --inspect          # one line per split: classes, images, size
    python autometa.py --train runs/search/best.json  # meta-train a found cell (or conv4, autometa)
    python autometa.py --eval runs/train-best/best.pt # test accuracy, 95% CI over fixed test episodes
    python autometa.py --draw autometa --out cell.png # a picture of a cell (built-in, JSON file or inline JSON)
    torchrun --nproc_per_node=4 autometa.py --search  # the same search, candidates shared by 4 processes
    python autometa.py --bench conv4 --preset paper   # seconds per meta-step against a per-task loop

Settings live in `Config`; a preset fills it and every flag overrides one field.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import bench
import cells
import data
import maml
import pnas
import report

ALL_OPS = tuple(cells.OPS)


@dataclass
class Config:
    data: str = "synthetic"      # 'synthetic' (built-in glyphs) or a folder in a supported layout
    image_size: int = 0          # side images are resized to; 0: 28 for synthetic, 84 otherwise
    ways: int = 5                # N classes per episode
    shots: int = 1               # K support images per class
    queries: int = 5             # Q query images per class
    blocks: int = 3              # B, the most blocks a cell gets
    beam: int = 5                # K cells scored per level after the first
    ops: tuple = ALL_OPS         # the op names the search may use
    max_first: int = 12          # score a seeded sample of this many 1-block cells (0: all 105)
    cells: int = 1               # normal cells per stage of the network
    channels: int = 8            # channels of the first stage (doubled at every reduction)
    reductions: int = 2          # reduction cells (each halves the resolution)
    stem_stride: int = 2         # stride of the stem convolution
    meta_iters: int = 60         # meta-iterations per search candidate
    train_iters: int = 300       # meta-iterations for --train
    meta_batch: int = 2          # tasks per meta-iteration (0: 4 for 1-shot, 2 otherwise)
    inner_steps: int = 1         # SGD steps of adaptation while meta-training
    test_steps: int = 3          # SGD steps of adaptation when evaluating
    inner_lr: float = 0.1        # inner-loop (adaptation) learning rate
    meta_lr: float = 3e-3        # Adam learning rate of the outer loop
    first_order: bool = True     # drop second-order terms of the meta-gradient
    eval_episodes: int = 50      # fixed episodes a candidate is scored on (val) and --eval tests on
    val_episodes: int = 50       # fixed validation episodes of --train
    val_every: int = 50          # --train validates and checkpoints every this many iterations
    log_every: int = 20          # --train prints a progress line every this many iterations
    device: str = "auto"         # 'auto' (CUDA if present), 'cpu', 'cuda' or 'cuda:N'
    wait_minutes: float = 60     # under torchrun: how long a process waits for another before failing the job
    seed: int = 0                # seeds data, episodes, candidates and the predictor
    out: str = "runs/search"     # output folder (search.jsonl, best.json, ...)
    cache_dir: str = ""          # where decoded datasets are cached ('' : OUT/../cache)


PRESETS = {
    # Finishes in about 5 minutes on 2 CPU cores and finds a cell clearly above chance.
    "tiny": {},
    # The published protocols (MAML and Auto-Meta on Mini-ImageNet); the search sizes are ours.
    "paper": dict(image_size=84, queries=15, blocks=5, beam=8, max_first=0, channels=16, cells=1,
                  reductions=3, stem_stride=1, meta_iters=2000, train_iters=60000, meta_batch=0,
                  inner_steps=5, test_steps=10, inner_lr=0.01, meta_lr=1e-3, first_order=False,
                  eval_episodes=600, val_episodes=100, val_every=1000, log_every=100),
}

# Fields that do not change a run's results, so a resumed run may differ in them.
RESUME_FREE = {
    "search": {"device", "out", "cache_dir", "wait_minutes", "train_iters", "val_episodes", "val_every", "log_every"},
    "train": {"device", "out", "cache_dir", "wait_minutes", "train_iters", "eval_episodes", "log_every",
              "blocks", "beam", "ops", "max_first", "meta_iters"},
}


class ConfigError(ValueError):
    """A bad flag or setting; the message names the problem and the fix."""


def make_parser():
    """argparse with one flag per Config field; defaults are None so a preset can fill them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--search", action="store_true", help="run a progressive architecture search")
    mode.add_argument("--inspect", action="store_true", help="print one line per data split")
    mode.add_argument("--train", metavar="ARCH", help="meta-train conv4, autometa, a cell JSON or a best.json")
    mode.add_argument("--eval", metavar="CHECKPOINT", help="test a --train checkpoint on fixed test episodes")
    mode.add_argument("--draw", metavar="CELL", help="draw a cell (built-in name, JSON file or inline JSON list) "
                      "to the PNG file --out")
    mode.add_argument("--bench", nargs="?", const="all", choices=bench.WORKLOADS,
                      help="time the meta-step against a per-task loop: conv4, cell or all (default)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="settings to start from (default: tiny)")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "first_order":
            p.add_argument("--first-order", dest="first_order", action="store_true", default=None)
            p.add_argument("--second-order", dest="first_order", action="store_false")
        elif f.name == "ops":
            p.add_argument(flag, default=None, help="comma-separated op names (default: all 7)")
        else:
            p.add_argument(flag, type=f.type if f.type in (int, float) else str, default=None)
    return p


def make_config(args, base=None):
    """Config from `base` (a preset's or a checkpoint's settings) plus the flags given, validated."""
    values = dict(base if base is not None else PRESETS[args.preset or "tiny"])
    if base is not None and args.preset:
        values.update(PRESETS[args.preset])
    values.update({k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__ and v is not None})
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
    for name in ("image_size", "ways", "shots", "queries", "blocks", "beam", "cells", "channels", "stem_stride",
                 "meta_iters", "train_iters", "meta_batch", "eval_episodes", "val_episodes", "val_every", "log_every"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} is {getattr(cfg, name)}: it must be a positive integer")
    for name in ("reductions", "inner_steps", "test_steps", "max_first"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} is {getattr(cfg, name)}: it must be 0 or more")
    for name in ("inner_lr", "meta_lr", "wait_minutes"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} is {getattr(cfg, name)}: it must be a positive number")
    unknown = [o for o in cfg.ops if o not in cells.OPS]
    if unknown or not cfg.ops:
        raise ConfigError(f"--ops names unknown op(s) {', '.join(unknown) or '(none given)'}: choose from {', '.join(cells.OPS)}")
    if cfg.ways < 2:
        raise ConfigError(f"--ways is {cfg.ways}: an episode needs at least 2 classes")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ConfigError(f"--out {cfg.out} is a file: pass a folder (new, or one a previous run wrote)")


def pick_device(name):
    """'auto' -> CUDA when present, else CPU; a CUDA device asked for on a machine without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but this machine has no CUDA GPU: use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def load_data(cfg, splits_needed=("train", "val", "test")):
    """Load the dataset and check every needed split can give the configured episodes."""
    cache = cfg.cache_dir or os.path.join(os.path.dirname(os.path.abspath(cfg.out)), "cache")
    splits = data.load_splits(cfg.data, cfg.image_size, cache, seed=cfg.seed)
    for name in splits_needed:
        data.check_split(splits[name], cfg.ways, cfg.shots, cfg.queries)
    return splits


def build_model(cfg, arch):
    """The network for a cell (or 'conv4') under this config."""
    return cells.build_network(arch, cfg.ways, cfg.image_size, cfg.channels, cfg.cells, cfg.reductions,
                               cfg.stem_stride)


def candidate_seed(seed, cell):
    """A seed from (global seed, canonical cell): a candidate's score never depends on search order."""
    digest = hashlib.sha256(f"{seed}:{cells.cell_key(cell)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def make_scorer(cfg, splits, device):
    """score(cell): meta-train a fresh network on train episodes, evaluate on fixed val episodes."""
    episodes = data.fixed_episodes(splits["val"], cfg.ways, cfg.shots, cfg.queries, cfg.eval_episodes,
                                   seed=cfg.seed, batch=cfg.meta_batch)

    def score(cell):
        cell = cells.canonical(cell)  # the same network, weights and seed however the halves are written
        seed = candidate_seed(cfg.seed, cell)
        torch.manual_seed(seed)
        model = build_model(cfg, cell).to(device)
        sampler = data.EpisodeSampler(splits["train"], cfg.ways, cfg.shots, cfg.queries, seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.meta_lr)
        maml.meta_train(model, optimizer, lambda: sampler.sample(cfg.meta_batch), cfg.meta_iters,
                        cfg.inner_steps, cfg.inner_lr, cfg.first_order)
        accuracy, ci95 = maml.evaluate(model, dict(model.named_parameters()), episodes, cfg.test_steps, cfg.inner_lr)
        return {"accuracy": round(accuracy, 5), "ci95": round(ci95, 5), "params": cells.count_parameters(model)}

    return score


def check_resume(cfg, kind="search"):
    """Refuse to mix a new config into an OUT folder written by another; record the config otherwise."""
    path = os.path.join(cfg.out, "config.json")
    free = RESUME_FREE[kind]
    current = {k: v for k, v in config_dict(cfg).items() if k not in free}
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = {k: v for k, v in json.load(f).items() if k not in free}
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: delete it only if the run beside it is yours to discard, "
                              "or choose a new --out") from e
        if saved.pop("run", kind) != kind:
            raise ConfigError(f"{cfg.out} holds a run of another kind than --{kind}: pass a new --out")
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if changed:
            raise ConfigError(f"{cfg.out} holds a {kind} run with different settings ({', '.join(changed)}): "
                              f"rerun with the same flags to resume it, or pass a new --out to start fresh")
    else:
        os.makedirs(cfg.out, exist_ok=True)
        pnas.write_json(path, {"run": kind, **config_dict(cfg)})


def config_dict(cfg):
    """Config as JSON-ready data."""
    d = dataclasses.asdict(cfg)
    d["ops"] = list(cfg.ops)
    return d


def rank_device(device):
    """Under torchrun a CUDA device means this process's own GPU, cuda:LOCAL_RANK."""
    if device.type != "cuda":
        return device
    local_rank, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
    if local_rank >= gpus:
        raise ConfigError(f"torchrun started process {local_rank} on a machine with {gpus} GPU(s): "
                          f"pass --nproc_per_node={gpus} or less")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def run_search(cfg):
    """The --search command. Started by torchrun (WORLD_SIZE > 1), every process runs it and they share the work."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return search_with(cfg, team=None)
    team = pnas.Team.join(cfg.wait_minutes)
    if team.rank == 0:  # torchrun sends SIGTERM to stop the job, e.g. when another process has failed
        signal.signal(signal.SIGTERM, lambda *_: stopped_by_torchrun(cfg.out))
    try:
        return search_with(cfg, team)
    finally:
        team.leave()


def stopped_by_torchrun(out):
    """Say where the results are and exit now, without waiting for the candidate rank 0 is training."""
    print(f"autometa: stopped by torchrun (another process failed or the job was interrupted); every result so "
          f"far is in {out}/search.jsonl: rerun the same command to resume", file=sys.stderr, flush=True)
    os._exit(1)


def search_with(cfg, team):
    """Search in this process alone (team None) or as one rank of a torchrun job, where rank 0 prints and writes."""
    device = pick_device(cfg.device) if team is None else rank_device(pick_device(cfg.device))
    if team is not None and team.rank > 0:  # score what rank 0 shares out; print and write nothing
        dist.barrier()  # rank 0 decodes and caches the dataset first; this rank then reads the cache
        return team.serve(make_scorer(cfg, load_data(cfg, ("train", "val")), device))
    check_resume(cfg)
    splits = load_data(cfg, ("train", "val"))
    if team is not None:
        dist.barrier()
        print(f"candidates shared among {team.size} processes (torchrun)")
    print(f"search: {cfg.blocks} blocks, beam {cfg.beam}, {cfg.ways}-way {cfg.shots}-shot on {cfg.data} "
          f"({cfg.image_size}x{cfg.image_size}), {cfg.meta_iters} meta-iterations per candidate, device {device}")
    start = time.time()

    def refresh(level, records):  # after every level, so a long search can be watched as it goes
        report.write_report(cfg.out, records, config_dict(cfg))

    best = pnas.search(make_scorer(cfg, splits, device), cfg.out, cfg.blocks, cfg.beam, cfg.ops,
                       cfg.max_first, cfg.seed, config=config_dict(cfg), on_level=refresh, team=team)
    print(f"best cell: {json.dumps(best['cell'])}")
    print(f"validation accuracy {100 * best['accuracy']:.2f}% ± {100 * best['ci95']:.2f}% "
          f"(chance {100 / cfg.ways:.0f}%), {best['params']} parameters")
    print(f"results in {cfg.out}/: search.jsonl (every candidate), best.json (use with --train), "
          f"report.md with report.png and best_cell.png; {time.time() - start:.0f} s")


# ---------------------------------------------------------------------------- --train and --eval

def arch_name(arch):
    """'conv4' or a cell's JSON text, for logs and checkpoints."""
    return arch if arch == "conv4" else json.dumps(cells.cell_to_json(arch))


def save_checkpoint(path, state):
    """torch.save atomically: a temporary file, then a rename, so a kill never leaves half a file."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """A checkpoint written by --train; a missing or unreadable file is a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path} does not exist: pass a best.pt or last.pt written by --train")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a damaged file
        raise ConfigError(f"checkpoint {path} cannot be read ({type(e).__name__}): it is damaged or not a "
                          "torch file; use another checkpoint or retrain with --train") from e
    missing = {"model", "config", "arch", "iteration"} - set(state) if isinstance(state, dict) else {"model"}
    if missing:
        raise ConfigError(f"{path} is not an autometa checkpoint (no {', '.join(sorted(missing))}): "
                          "pass a best.pt or last.pt written by --train")
    return state


def parse_arch(text):
    """'conv4' stays a name; anything else becomes a validated cell tuple."""
    return "conv4" if text == "conv4" else cells.load_arch(text)


class Trainer:
    """Meta-trains one architecture with maml.meta_train, validating, logging and checkpointing."""

    def __init__(self, cfg, arch, splits, device):
        self.cfg, self.arch = cfg, arch
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, arch).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.meta_lr)
        self.sampler = data.EpisodeSampler(splits["train"], cfg.ways, cfg.shots, cfg.queries, cfg.seed)
        self.val = data.fixed_episodes(splits["val"], cfg.ways, cfg.shots, cfg.queries, cfg.val_episodes,
                                       seed=cfg.seed + 1, batch=cfg.meta_batch)
        self.iteration, self.history, self.best = 0, [], None
        self.log_path = os.path.join(cfg.out, "train.jsonl")

    def state(self):
        """Everything needed to resume training or to evaluate without the original flags."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "iteration": self.iteration, "config": config_dict(self.cfg), "arch": arch_name(self.arch),
                "history": self.history, "best": self.best, "sampler_rng": self.sampler.rng.bit_generator.state,
                "torch_rng": torch.get_rng_state()}

    def restore(self, state):
        """Continue from a last.pt; train.jsonl rows written after it are dropped."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration, self.history, self.best = state["iteration"], state["history"], state["best"]
        self.sampler.rng.bit_generator.state = state["sampler_rng"]
        torch.set_rng_state(state["torch_rng"])
        rows = [r for r in self.rows() if r["iteration"] <= self.iteration]
        with open(self.log_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def rows(self):
        """The complete rows of train.jsonl."""
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]

    def on_step(self, i, loss, accuracy):
        """After meta-iteration i: log, and every val_every iterations validate and checkpoint."""
        cfg, self.iteration = self.cfg, i + 1
        row = {"iteration": self.iteration, "loss": round(loss, 5), "train_accuracy": round(accuracy, 5),
               "val_accuracy": None, "seconds": round(time.time() - self.start, 2)}
        if self.iteration % cfg.val_every == 0 or self.iteration == cfg.train_iters:
            row["val_accuracy"], _ = maml.evaluate(self.model, dict(self.model.named_parameters()), self.val,
                                                   cfg.test_steps, cfg.inner_lr)
            self.history.append({"iteration": self.iteration, "val_accuracy": row["val_accuracy"]})
            if self.best is None or row["val_accuracy"] > self.best["val_accuracy"]:
                self.best = dict(self.history[-1])
                save_checkpoint(os.path.join(cfg.out, "best.pt"), self.state())
            save_checkpoint(os.path.join(cfg.out, "last.pt"), self.state())
        if row["val_accuracy"] is not None or self.iteration % cfg.log_every == 0:
            pnas.append_log(self.log_path, row)
            if row["val_accuracy"] is not None:
                report.draw_training(self.rows(), os.path.join(cfg.out, "train.png"), chance=1 / cfg.ways)
            done = self.iteration - self.first
            rate = done / max(row["seconds"], 1e-9)
            val = "" if row["val_accuracy"] is None else f"  val {100 * row['val_accuracy']:5.2f}%"
            print(f"iter {self.iteration}/{cfg.train_iters}  loss {loss:.4f}  train {100 * accuracy:5.2f}%{val}  "
                  f"{rate:.2f} it/s  ETA {(cfg.train_iters - self.iteration) / rate / 60:.1f} min", flush=True)

    def run(self):
        """Meta-train from the current iteration to cfg.train_iters."""
        self.start, self.first = time.time(), self.iteration
        maml.meta_train(self.model, self.optimizer, lambda: self.sampler.sample(self.cfg.meta_batch),
                        self.cfg.train_iters, self.cfg.inner_steps, self.cfg.inner_lr, self.cfg.first_order,
                        start=self.iteration, callback=self.on_step)


def run_train(cfg, arch_text):
    """The --train command: resumes from OUT/last.pt when it exists."""
    arch = parse_arch(arch_text)
    device = pick_device(cfg.device)
    check_resume(cfg, "train")
    splits = load_data(cfg, ("train", "val"))
    trainer = Trainer(cfg, arch, splits, device)
    last = os.path.join(cfg.out, "last.pt")
    if os.path.exists(last):
        state = load_checkpoint(last)
        if state["arch"] != arch_name(arch):
            raise ConfigError(f"{cfg.out} holds training of another architecture: pass a new --out to start fresh")
        trainer.restore(state)
        print(f"resuming from {last} at iteration {trainer.iteration}")
    print(f"train: {arch_name(arch)}, {cells.count_parameters(trainer.model)} parameters, {cfg.ways}-way "
          f"{cfg.shots}-shot on {cfg.data}, {cfg.train_iters} meta-iterations, device {device}")
    try:
        trainer.run()
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to resume from the last checkpoint in {cfg.out}", file=sys.stderr)
        return 130
    if trainer.iteration == cfg.train_iters and trainer.best is not None:
        print(f"best validation accuracy {100 * trainer.best['val_accuracy']:.2f}% at iteration "
              f"{trainer.best['iteration']}; checkpoints in {cfg.out}/ (best.pt, last.pt), log in train.jsonl")
    return 0


def run_eval(args):
    """The --eval command: the standard protocol on fixed, seeded test episodes."""
    state = load_checkpoint(args.eval)
    cfg = make_config(args, base=state["config"])
    device = pick_device(cfg.device)
    splits = load_data(cfg, ("test",))
    model = build_model(cfg, parse_arch_json(state["arch"])).to(device)
    model.load_state_dict(state["model"])
    episodes = data.fixed_episodes(splits["test"], cfg.ways, cfg.shots, cfg.queries, cfg.eval_episodes,
                                   seed=cfg.seed + 2, batch=cfg.meta_batch)
    accuracy, ci95 = maml.evaluate(model, dict(model.named_parameters()), episodes, cfg.test_steps, cfg.inner_lr)
    print(f"test accuracy: {100 * accuracy:.2f}% ± {100 * ci95:.2f}% (95% CI, {cfg.eval_episodes} episodes)")
    return 0


def parse_arch_json(name):
    """The inverse of arch_name."""
    return "conv4" if name == "conv4" else cells.parse_cell(json.loads(name))


def run_inspect(cfg):
    """The --inspect command."""
    for line in data.describe(data.load_splits(cfg.data, cfg.image_size, cfg.cache_dir or None, seed=cfg.seed)):
        print(line)


def run_draw(arch, path):
    """The --draw command: a picture of a built-in cell, a JSON cell file or an inline JSON list of blocks."""
    if not path:
        raise ConfigError("--draw needs --out FILE.png, the file to write the picture to")
    if not path.lower().endswith(".png"):
        raise ConfigError(f"--out {path} is not a .png file: --draw writes a PNG, pass --out FILE.png")
    if arch.lstrip().startswith("["):
        try:
            cell = cells.parse_cell(json.loads(arch))
        except json.JSONDecodeError as e:
            raise cells.CellError(f"--draw {arch!r} is not valid JSON ({e.msg}): write the cell as a JSON list "
                                  "of blocks [in1, \"op1\", in2, \"op2\"]") from e
        title = None
    else:
        cell, title = cells.load_arch(arch), os.path.basename(arch)
    if cell == "conv4":
        raise cells.CellError("conv4 is MAML's fixed 4-layer network, not a cell: draw a cell such as autometa")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    report.draw_cell(cell, path, title)
    print(f"wrote {path}")


def run_bench(cfg, which):
    """The --bench command: the workloads of README.md's Speed section under this config (bench.py)."""
    device = pick_device(cfg.device)
    bench.run(cfg, load_data(cfg, ("train", "val")), device, make_scorer, which)


def main(argv=None):
    """Parse flags, run one command; bad input exits 2 with one sentence."""
    args = make_parser().parse_args(argv)
    if args.bench is None:  # --bench times the loops with and without it
        maml.reuse_freed_memory()
    try:
        if args.eval is not None:
            return run_eval(args)
        cfg = make_config(args)
        if args.search:
            run_search(cfg)
        elif args.inspect:
            run_inspect(cfg)
        elif args.train is not None:
            if args.out is None:
                cfg.out = os.path.join("runs", "train-" + os.path.splitext(os.path.basename(args.train))[0])
            return run_train(cfg, args.train)
        elif args.draw is not None:
            run_draw(args.draw, args.out)
        elif args.bench is not None:
            run_bench(cfg, args.bench)
    except (ConfigError, data.DataError, cells.CellError, pnas.LogError) as e:
        print(f"autometa: error: {e}", file=sys.stderr)
        return 2
    except pnas.SearchError as e:
        print(f"autometa: search failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
