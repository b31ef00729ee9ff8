"""Meta-training one architecture for real (--train) with validation and checkpoints, and testing a
checkpoint on fixed test episodes (--eval)."""
import dataclasses
import json
import os
import time
import warnings

import torch

import cells
import data
import maml
import pnas
import report
import speedups
from config import ConfigError, config_dict, train_out
from files import atomic_write, save_torch
from scoring import build_model


def load_checkpoint(path):
    """A checkpoint written by --train; a missing or unreadable file is a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(not_a_checkpoint(path) or f"checkpoint {path} does not exist: pass a best.pt or last.pt "
                          "written by --train")
    try:
        with warnings.catch_warnings():  # a damaged file can warn before it fails: the sentence below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a damaged file
        raise ConfigError(not_a_checkpoint(path) or f"checkpoint {path} cannot be read ({type(e).__name__}): it "
                          "is damaged or not a torch file; use another checkpoint or retrain with --train") from e
    missing = {"model", "config", "arch", "iteration"} - set(state) if isinstance(state, dict) else {"model"}
    if missing:
        raise ConfigError(f"{path} is not an autometa checkpoint (no {', '.join(sorted(missing))}): "
                          "pass a best.pt or last.pt written by --train")
    return state


def training_seed(cfg):
    """The seed of the weights and of the training episodes: one of --seeds in a run of several, else --seed.
    The data and the validation and test episodes always come from --seed, so runs of several seeds
    are tested alike."""
    return int(cfg.seeds) if cfg.seeds else cfg.seed


def seed_runs(cfg):
    """[(training seed, config of its run in OUT/seed-N)] for --seeds; [(None, cfg)] without it."""
    if not cfg.seeds:
        return [(None, cfg)]
    return [(s, dataclasses.replace(cfg, seeds=str(s), out=os.path.join(cfg.out, f"seed-{s}")))
            for s in parse_seeds(cfg.seeds)]


def parse_seeds(text):
    """'0,1,2' -> [0, 1, 2]; a ConfigError names what is wrong."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} is not a comma-separated list of integers: write e.g. --seeds 0,1,2") \
            from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} names a seed twice: list each seed once")
    return seeds


def not_a_checkpoint(path):
    """What to do instead when `path` is a folder or an architecture (a search's best.json, a cell) rather
    than a checkpoint; None otherwise."""
    if os.path.isdir(path):
        return (f"{path} is a folder, not a checkpoint, and holds no best.pt nor seed-N runs: pass the folder of a "
                "--train run, or a best.pt or last.pt it wrote")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read(64).lstrip()[:1] not in (b"[", b"{"):  # not JSON: a damaged checkpoint, maybe
                return None
    try:
        cells.load_arch(path)
    except (cells.CellError, OSError):
        return None
    return (f"{path} is an architecture, not a checkpoint: meta-train it first with --train {path}, then pass "
            f"--eval {os.path.join(train_out(path), 'best.pt')}")


class Trainer:
    """Meta-trains one architecture with maml.meta_train, validating, logging and checkpointing."""

    def __init__(self, cfg, arch, splits, device):
        self.cfg, self.arch = cfg, arch
        seed = training_seed(cfg)
        torch.manual_seed(seed)
        self.model = build_model(cfg, arch).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.meta_lr)
        self.sampler = data.EpisodeSampler(splits["train"], cfg.ways, cfg.shots, cfg.queries, seed)
        self.val = data.fixed_episodes(splits["val"], cfg.ways, cfg.shots, cfg.queries, cfg.val_episodes,
                                       seed=cfg.seed + 1, batch=cfg.meta_batch)
        self.iteration, self.history, self.best = 0, [], None
        self.log_path = os.path.join(cfg.out, "train.jsonl")

    def state(self):
        """Everything needed to resume training or to evaluate without the original flags."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "iteration": self.iteration, "config": config_dict(self.cfg), "arch": json.dumps(self.arch),
                "history": self.history, "best": self.best, "sampler_rng": self.sampler.rng.bit_generator.state,
                "torch_rng": torch.get_rng_state()}

    def restore(self, state):
        """Continue from a last.pt."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration, self.history, self.best = state["iteration"], state["history"], state["best"]
        self.sampler.rng.bit_generator.state = state["sampler_rng"]
        torch.set_rng_state(state["torch_rng"])

    def trim_log(self):
        """Drop the rows of train.jsonl after the current iteration: a killed run logs beyond its last
        checkpoint (or before its first), and the rerun logs those iterations again."""
        rows = [r for r in self.rows() if r["iteration"] <= self.iteration]
        if os.path.exists(self.log_path):
            atomic_write(self.log_path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))

    def rows(self):
        """The complete rows of train.jsonl."""
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]

    def validate(self):
        """Validation accuracy now; checkpoints last.pt, and best.pt when it is the best so far."""
        accuracy, _ = maml.evaluate(self.model, dict(self.model.named_parameters()), map(self.fast.layout, self.val),
                                    self.cfg.test_steps, self.cfg.inner_lr, self.fast.per_episode)
        self.history.append({"iteration": self.iteration, "val_accuracy": accuracy})
        if self.best is None or accuracy > self.best["val_accuracy"]:
            self.best = dict(self.history[-1])
            save_torch(os.path.join(self.cfg.out, "best.pt"), self.state())
        save_torch(os.path.join(self.cfg.out, "last.pt"), self.state())
        return accuracy

    def on_step(self, i, loss, accuracy):
        """After meta-iteration i: log, and every val_every iterations validate and checkpoint."""
        cfg, self.iteration = self.cfg, i + 1
        row = {"iteration": self.iteration, "loss": round(loss, 5), "train_accuracy": round(accuracy, 5),
               "val_accuracy": None, "seconds": round(time.time() - self.start, 2)}
        if self.iteration % cfg.val_every == 0 or self.iteration == cfg.train_iters:
            row["val_accuracy"] = self.validate()
        if row["val_accuracy"] is None and self.iteration % cfg.log_every:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if row["val_accuracy"] is not None:
            report.draw_training(self.rows(), os.path.join(cfg.out, "train.png"), chance=1 / cfg.ways)
        rate = (self.iteration - self.first) / max(row["seconds"], 1e-9)
        val = "" if row["val_accuracy"] is None else f"  val {100 * row['val_accuracy']:5.2f}%"
        print(f"iter {self.iteration}/{cfg.train_iters}  loss {loss:.4f}  train {100 * accuracy:5.2f}%{val}  "
              f"{rate:.2f} it/s  ETA {(cfg.train_iters - self.iteration) / rate / 60:.1f} min", flush=True)

    def run(self):
        """Meta-train from the current iteration to cfg.train_iters."""
        cfg = self.cfg
        self.start, self.first = time.time(), self.iteration
        self.fast = speedups.choose(self.model, cfg.first_order, cfg.eval_batch)
        maml.meta_train(self.model, self.optimizer, lambda: self.fast.layout(self.sampler.sample(cfg.meta_batch)),
                        cfg.train_iters, cfg.inner_steps, cfg.inner_lr, cfg.first_order,
                        start=self.iteration, callback=self.on_step, meta_loss=self.fast.meta_loss)


def train(cfg, arch, splits, device):
    """Meta-train `arch` into cfg.out, resuming from cfg.out/last.pt when it exists; returns the Trainer."""
    last = os.path.join(cfg.out, "last.pt")
    state = load_checkpoint(last) if os.path.exists(last) else None
    if state is not None:
        saved = cells.load_arch(state["arch"])
        if pnas.canonical(saved) != pnas.canonical(arch):  # one network, however each is written
            raise ConfigError(f"{cfg.out} holds training of another architecture ({state['arch']}): pass a new --out "
                              "to start fresh")
        arch = saved  # the same network, written as when its weights were named
    trainer = Trainer(cfg, arch, splits, device)
    if state is not None:
        trainer.restore(state)
        print(f"resuming from {last} at iteration {trainer.iteration}")
    trainer.trim_log()
    print(f"train: {json.dumps(arch)}, {cells.count_parameters(trainer.model)} parameters, {cfg.ways}-way "
          f"{cfg.shots}-shot on {cfg.data}, {cfg.train_iters} meta-iterations, device {device}")
    trainer.run()
    return trainer


def checkpoints(path):
    """[(label, checkpoint path)] for --eval: a checkpoint file, a --train folder (its best.pt), or a
    folder of --seeds runs (each seed-N/best.pt)."""
    if not os.path.isdir(path):
        return [(None, path)]
    runs = sorted((int(name[5:]), os.path.join(path, name, "best.pt")) for name in os.listdir(path)
                  if name.startswith("seed-") and name[5:].lstrip("-").isdigit())
    if runs:
        return [(f"seed {s}", p) for s, p in runs]
    best = os.path.join(path, "best.pt")
    return [(None, best if os.path.isfile(best) else path)]  # a folder with no checkpoint: load_checkpoint says so


def checkpoint_accuracy(cfg, state, splits, device):
    """(accuracy, ci95) of a checkpoint's weights on cfg.eval_episodes seeded test episodes."""
    model = build_model(cfg, cells.load_arch(state["arch"])).to(device)
    model.load_state_dict(state["model"])
    episodes = data.fixed_episodes(splits["test"], cfg.ways, cfg.shots, cfg.queries, cfg.eval_episodes,
                                   seed=cfg.seed + 2, batch=cfg.meta_batch)
    fast = speedups.choose(model, True, cfg.eval_batch)
    return maml.evaluate(model, dict(model.named_parameters()), map(fast.layout, episodes), cfg.test_steps,
                         cfg.inner_lr, fast.per_episode)
