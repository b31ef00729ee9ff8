"""--bench objective: does the search's objective rank cells the way training does?

The search scores a candidate by a short MAML meta-training (scoring.py); what it stands for is the
accuracy the cell reaches when trained for real. This measures the proxy against what it stands
for, as NAS benchmarks do. A fixed panel of cells, chosen as a search's last levels see them (conv4,
the two-conv chain, wider and deeper convolution cells, convolutions beside pools and identities,
separable and dilated convolutions, 2- and 3-block cells), is

- trained for real, as the README's experiment trains a ``best.json``: ``--train`` at the preset's
  training settings with training seeds 0, 1, 2, each tested on 200 test episodes. Kept in
  OUT/train-NAME/seed-N and OUT/trained.json, so a second run, with other objective settings, reuses it;
- scored by the search's objective at this command's settings, with trials (training seeds) 0, 1, 2.

It prints each cell's figures, then the Spearman correlation between the objective and the trained
accuracy (one seed, as a search scores a candidate, and the mean of three), whether both put the same
cell first, how well two seeds of the objective agree, and its seconds per score; the summary is
appended to OUT/objective.jsonl. Run it as

    python autometa.py --bench objective --out runs/objective                   # the objective as it is
    python autometa.py --bench objective --out runs/objective --meta-iters 120  # a lever, same trained panel
"""
import contextlib
import dataclasses
import io
import itertools
import json
import os
import statistics
import time

import cells
import pnas
import training
from config import ConfigError, config_dict, make_config, resume_free
from files import hold, write_json
from scoring import make_scorer, parameters

PANEL = {
    "conv4": [[1, "conv_3x3", 1, "none"]],
    "chain": [[1, "conv_3x3", 1, "none"], [2, "conv_3x3", 2, "none"]],
    "wide": [[1, "conv_3x3", 1, "conv_3x3"]],
    "conv15_conv3": [[1, "conv_1x5_5x1", 1, "conv_3x3"]],
    "conv_maxpool": [[1, "conv_3x3", 1, "max_pool_3x3"]],
    "conv_identity": [[1, "conv_3x3", 1, "identity"]],
    "sep": [[1, "sep_conv_3x3", 1, "none"]],
    "dil": [[1, "dil_conv_3x3", 1, "none"]],
    "conv15": [[1, "conv_1x5_5x1", 1, "none"]],
    "three": [[1, "conv_3x3", 1, "none"], [1, "conv_3x3", 1, "none"], [2, "conv_3x3", 2, "none"]],
    "conv_sep": [[1, "conv_3x3", 1, "none"], [2, "sep_conv_3x3", 2, "none"]],
    "residual": [[1, "conv_3x3", 1, "none"], [2, "conv_3x3", 2, "identity"]],
}
SEEDS = (0, 1, 2)     # training seeds of the panel's training, and trials of the objective
TEST_EPISODES = 200   # the README experiment's --eval-episodes
CLOSE = 0.10          # the panel's cells within this of conv4 after training are ranked on their own too
# What the trained panel takes from the command line; the rest of its settings are the preset's, so that the
# objective's own settings (--meta-iters, --eval-episodes, --meta-lr, --draws, ...) can change beside one panel.
TRAINED_BY = ("data", "image_size", "ways", "shots", "queries", "channels", "cells", "reductions", "seed",
              "train_iters", "val_episodes", "val_every")


def panel_cell(name):
    """Panel cell `name` as the program holds every cell: a canonical tuple (pnas.canonical)."""
    return pnas.canonical(cells.parse_cell(PANEL[name]))


def training_config(cfg, preset):
    """The settings the panel is trained with: the preset's, on this command's data, task, network and
    training length."""
    base = make_config({name: getattr(cfg, name) for name in TRAINED_BY}, preset)
    return dataclasses.replace(base, device=cfg.device, threads=cfg.threads, cache_dir=cfg.cache_dir,
                               eval_episodes=TEST_EPISODES, out=cfg.out)


def trained_accuracies(cfg, preset, splits, device, names, say=print):
    """{name: [test accuracy of training seed s for s in SEEDS]} of the panel, from OUT/trained.json when it
    holds them, else trained and tested now (and added to it)."""
    train_cfg = training_config(cfg, preset)
    # what its test accuracies depend on: every setting a resumed --train may not change, and the test episodes
    free = resume_free("train") - {"eval_episodes"}
    settings = {k: v for k, v in config_dict(train_cfg).items() if k not in free}
    path = os.path.join(cfg.out, "trained.json")
    found = {"settings": settings, "cells": {}}
    if os.path.exists(path):
        with open(path) as f:
            found = json.load(f)
        changed = sorted(k for k in settings if found["settings"].get(k) != settings[k])
        if changed:
            raise ConfigError(f"{path} holds a panel trained with other settings ({', '.join(changed)}): pass the "
                              "same --data, task and network flags, or a new --out")
    missing = [name for name in names if found["cells"].get(name, {}).get("cell") != PANEL[name]]
    with hold(cfg.out) if missing else contextlib.nullcontext():  # training writes there; scoring alone does not
        for name in missing:
            train_panel_cell(train_cfg, name, splits, device, found, path, say)
    return {name: found["cells"][name]["test"] for name in names}


def train_panel_cell(train_cfg, name, splits, device, found, path, say):
    """Train panel cell `name` with each training seed, test it, and record it in `found`, saved to `path`."""
    start, tests = time.time(), []
    for seed in SEEDS:
        run = dataclasses.replace(train_cfg, seeds=str(seed),
                                  out=os.path.join(train_cfg.out, f"train-{name}", f"seed-{seed}"))
        os.makedirs(run.out, exist_ok=True)
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer's progress lines
            training.train(run, panel_cell(name), splits, device)
        state = training.load_checkpoint(os.path.join(run.out, "best.pt"))
        tests.append(round(training.checkpoint_accuracy(run, state, splits, device)[0], 5))
    found["cells"][name] = {"cell": PANEL[name], "test": tests}
    write_json(path, found)
    say(f"trained {name}: test {', '.join(f'{100 * a:.2f}' for a in tests)}% ({time.time() - start:.0f} s)")


def objective_scores(cfg, splits, device, names):
    """({name: [the objective's score of trial t for t in SEEDS]}, seconds per score). A candidate that
    diverges scores 0: the search drops it, below every cell that trained."""
    score, scores, seconds = make_scorer(cfg, splits, device), {}, []
    for name in names:
        cell = panel_cell(name)
        scores[name] = []
        for trial in SEEDS:
            start = time.time()
            result = score(cell, trial=trial)
            seconds.append(time.time() - start)
            scores[name].append(result["accuracy"] if result.get("status", "ok") == "ok" else 0.0)
    return scores, statistics.mean(seconds)


def fidelity(objective, trained):
    """The summary figures of {name: [scores]} against {name: [trained accuracies]} (rank_figures), over the
    whole panel and, under "close", over the cells that train to within CLOSE of conv4: the ranking that
    decides which cell a search returns, without the easy gap to cells that train far worse."""
    figures = rank_figures(objective, trained)
    if "conv4" in trained:
        bar = statistics.mean(trained["conv4"]) - CLOSE
        close = [n for n in trained if statistics.mean(trained[n]) >= bar]
        if len(close) >= 3:
            figures["close"] = dict(cells=close, **rank_figures({n: objective[n] for n in close},
                                                                {n: trained[n] for n in close}))
    return figures


def rank_figures(objective, trained):
    """Spearman of one seed with training (each trial's, and their mean), of the mean of the seeds with
    training, the seeds' agreement (mean Spearman over pairs of trials), and which cell each puts first."""
    names = list(trained)
    truth = [statistics.mean(trained[n]) for n in names]
    mean = [statistics.mean(objective[n]) for n in names]
    single = [pnas.spearman([objective[n][t] for n in names], truth) for t in range(len(SEEDS))]
    pairs = [pnas.spearman([objective[n][a] for n in names], [objective[n][b] for n in names])
             for a, b in itertools.combinations(range(len(SEEDS)), 2)]
    return {"spearman_one_seed": [round(r, 3) for r in single],
            "spearman_one_seed_mean": round(statistics.mean(single), 3),
            "spearman_mean_of_seeds": round(pnas.spearman(mean, truth), 3),
            "seeds_agreement": round(statistics.mean(pairs), 3),
            "first_objective": names[max(range(len(names)), key=lambda i: mean[i])],
            "first_trained": names[max(range(len(names)), key=lambda i: truth[i])]}


def say_figures(title, figures):
    """One line of rank_figures."""
    print(f"{title}: Spearman, objective vs trained: one seed {figures['spearman_one_seed_mean']:+.3f} (seeds "
          f"{', '.join(f'{r:+.2f}' for r in figures['spearman_one_seed'])}), mean of {len(SEEDS)} seeds "
          f"{figures['spearman_mean_of_seeds']:+.3f}; two seeds agree {figures['seeds_agreement']:+.3f}; first: "
          f"{figures['first_objective']} by the objective, {figures['first_trained']} by training")


def run(cfg, preset, splits, device, names=None):
    """The command: the panel's table (or the cells `names` of it) and the summary; the summary is
    appended to OUT/objective.jsonl."""
    names = tuple(names or PANEL)
    os.makedirs(cfg.out, exist_ok=True)
    print(f"objective: {cfg.meta_iters} meta-iterations, {cfg.eval_episodes} episodes, meta-lr {cfg.meta_lr}, "
          f"{cfg.draws} draws; panel of {len(names)} cells, trained at "
          f"{training_config(cfg, preset).train_iters} meta-iterations and tested on {TEST_EPISODES} episodes",
          flush=True)
    trained = trained_accuracies(cfg, preset, splits, device, names)
    objective, seconds = objective_scores(cfg, splits, device, names)
    print(f"{'cell':<14} {'parameters':>10}  {'objective, seeds 0 1 2':<24} {'mean':>6}  "
          f"{'trained, seeds 0 1 2':<24} {'mean':>6}")
    def scores(values):
        return f"{' '.join(f'{100 * a:6.2f}' for a in values):<24} {100 * statistics.mean(values):6.2f}"

    for name in sorted(names, key=lambda n: -statistics.mean(trained[n])):
        print(f"{name:<14} {parameters(cfg, panel_cell(name)):>10,}  {scores(objective[name])}  "
              f"{scores(trained[name])}")
    summary = fidelity(objective, trained)
    say_figures("all cells", summary)
    if "close" in summary:
        say_figures(f"the {len(summary['close']['cells'])} cells within {100 * CLOSE:.0f} points of conv4",
                    summary["close"])
    print(f"{seconds:.1f} s per score ({len(names) * len(SEEDS)} scores)")
    row = dict(summary, seconds_per_score=round(seconds, 2), meta_iters=cfg.meta_iters,
               eval_episodes=cfg.eval_episodes, meta_lr=cfg.meta_lr, draws=cfg.draws,
               objective=objective, trained=trained)
    with open(os.path.join(cfg.out, "objective.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    return summary
