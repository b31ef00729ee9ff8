"""Auto-Meta: progressive architecture search for a MAML meta-learner (Kim et al., 2018); the command line.

Commands (see README.md for the figures they produce):

    python autometa.py --search                       # tiny search on the built-in synthetic glyphs
    python autometa.py --search --device cuda --preset paper --data PATH --out runs/paper
    python autometa.py --data PATH --inspect          # one line per split: classes, images, size
    python autometa.py --train runs/search/best.json  # meta-train a found cell (or conv4, autometa)
    python autometa.py --eval runs/train-best/best.pt # test accuracy, 95% CI over fixed test episodes
    python autometa.py --draw autometa --out cell.png # a picture of a cell (built-in, JSON file or inline JSON)
    python autometa.py --search --workers 1           # one candidate at a time (default: one per CPU core)
    torchrun --nproc_per_node=4 autometa.py --search  # the same search, candidates shared by 4 processes
    python autometa.py --bench conv4 --preset paper   # seconds per meta-step, with and without fastcpu.py
    python autometa.py --bench objective --out runs/objective  # how well the search's objective ranks cells

Settings live in `config.Config`; a preset fills it and every flag overrides one field. What the
commands run lives in modules named for it: scoring.py (a candidate's score), pnas.py (the search),
training.py (--train, --eval), team.py (--workers, torchrun), bench.py (--bench), fidelity.py (--bench
objective), report.py and drawing.py (pictures).
"""
import stops  # the standard library alone: in place before torch loads, so that a stop then is one line too

if __name__ == "__main__":
    stops.while_starting()

import argparse  # noqa: E402 (after the handlers)
import dataclasses
import json
import os
import shutil
import statistics
import sys
import threading
import time

import torch

import cells
import data
import pnas
from config import (PRESETS, Config, ConfigError, check_resume, config_dict, default_workers, make_config,
                    pick_device, train_out)
from files import FolderError, hold, write_json, writing

# Each command imports the rest of what it runs (report, team, training, bench, ...) when it starts.


def make_parser():
    """argparse with one flag per Config field; defaults are None so a preset can fill them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--search", action="store_true", help="run a progressive architecture search")
    mode.add_argument("--inspect", action="store_true", help="print one line per data split")
    mode.add_argument("--train", metavar="ARCH", help="meta-train an architecture: conv4, autometa, an inline "
                      "JSON cell, a JSON cell file or a search's best.json")
    mode.add_argument("--eval", metavar="CHECKPOINT", help="test a --train checkpoint on fixed test episodes")
    mode.add_argument("--draw", metavar="ARCH", help="draw a cell (same forms as --train) to the PNG file --out")
    mode.add_argument("--bench", nargs="?", const="all",
                      choices=("all", "conv4", "cell", "search", "overhead", "objective"),
                      help="time the meta-step with and without the speed-ups (conv4, cell), candidates per minute "
                      "(search), the loop against batched where only launches count (overhead), or all (default); "
                      "objective: the search's objective against training on a fixed panel of cells (fidelity.py)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="settings to start from (default: tiny)")
    for f in dataclasses.fields(Config):
        text = flag_help(f)
        if f.name == "first_order":
            p.add_argument("--first-order", dest="first_order", action="store_true", default=None, help=text)
            p.add_argument("--second-order", dest="first_order", action="store_false", help="keep them")
        else:
            p.add_argument("--" + f.name.replace("_", "-"), default=None, help=text,
                           type=f.type if f.type in (int, float) else str)
    return p


def flag_help(f):
    """A Config field's help line with its default, and the paper preset's value where that differs."""
    def shown(value):
        return ",".join(value) if isinstance(value, tuple) else repr(value) if value == "" else str(value)

    text = f"{f.metadata['help']} (default: {shown(f.default)}"
    if PRESETS["paper"].get(f.name, f.default) != f.default:
        text += f"; --preset paper: {shown(PRESETS['paper'][f.name])}"
    return (text + ")").replace("%", "%%")


def run_search(cfg):
    """The --search command: in this process, in the `--workers` processes it starts, or shared among the
    processes of a torchrun job."""
    import team

    if team.in_a_team():
        if cfg.workers > 1:
            raise ConfigError(f"--workers {cfg.workers} under torchrun: torchrun starts the processes here, so drop "
                              "--workers and set torchrun's --nproc_per_node")
        return team.run_search(cfg, lead=search)
    device = pick_device(cfg.device)
    workers = cfg.workers or default_workers(cfg, device)
    if workers > 1:
        return team.run_workers(cfg, workers, lead=search)
    return search(cfg, device)


def search(cfg, device, job=None):
    """Search in this process alone, or as rank 0 of a torchrun job (`job`), which alone prints and writes."""
    with hold(cfg.out), writing(cfg.out, "--out"):  # rank 0 alone holds and writes --out
        search_here(cfg, device, job)


def search_here(cfg, device, job):
    """The search itself, with --out held: levels, noise floor, re-scores, best.json and the report."""
    import report
    from scoring import candidates_dir, make_scorer, within_budget

    check_resume(cfg)
    splits = data.splits_for(cfg, ("train", "val"))
    if job is not None:
        job.barrier()
        print(f"candidates shared among {job.size} processes ({job.started_by})")
    print(f"search: {cfg.blocks} blocks, beam {cfg.beam} ({cfg.sampler}) + {cfg.probe} probes, {cfg.ways}-way "
          f"{cfg.shots}-shot on {cfg.data} ({cfg.image_size}x{cfg.image_size}), {cfg.meta_iters} meta-iterations "
          f"per candidate, device {device}")
    start, (first, screen) = time.time(), level_one(cfg)
    baseline = (cells.CONV4_CELL,)  # MAML's conv4 is a cell of this space: every search scores it
    log = pnas.SearchLog(os.path.join(cfg.out, "search.jsonl"))
    check_networks(cfg, log)
    score = make_scorer(cfg, splits, device, keep=candidates_dir(cfg))
    # how the candidates are scored: here one after another, or shared among the team's processes
    shared = dict(score_cells=pnas.score_each if job is None else job.score_all,
                  progress=pnas.Progress(cfg.blocks, cfg.beam + cfg.probe, after_levels(cfg),
                                         workers=1 if job is None else job.size))
    # the predictor's ops: the search's and the baseline's (conv4's "none", say, when --ops leaves it out)
    ops = tuple(dict.fromkeys(cfg.ops + tuple(op for cell in baseline for block in cell for op in block[1::2])))
    measured = pnas.search(score, log, blocks=cfg.blocks, beam=cfg.beam, ops=cfg.ops, first_cells=first,
                           predictor=pnas.Predictor(ops, seed=cfg.seed), probes=cfg.probe, sampler=cfg.sampler,
                           seed=cfg.seed, baseline=baseline, allowed=within_budget(cfg), **shared,
                           on_level=lambda b, records: report.write_report(cfg.out, records, config_dict(cfg)),
                           screen=screen, noise=(cfg.noise, cfg.noise_seeds))
    if screen:  # the screened cells' training, kept to train on from: level 1 is done with it
        shutil.rmtree(candidates_dir(cfg), ignore_errors=True)
    best = check_best(cfg, log, score, measured, shared)
    if job is not None:
        job.dismiss()
    records = list(log.records.values())
    report.write_report(cfg.out, records, config_dict(cfg))
    say_best(cfg, best, report.against_baseline(best, records), time.time() - start)


def after_levels(cfg):
    """The candidates' worth of work after the levels, for the ETA: noise scores and the re-scores, these
    counted by their meta-iterations."""
    return cfg.noise * (cfg.noise_seeds - 1) + round((cfg.rescore + 1) * cfg.rescore_seeds * cfg.rescore_iters / cfg.meta_iters)


def level_one(cfg):
    """(the 1-block cells level 1 starts from, pnas.search's `screen` or None). With a screen
    (scoring.candidates_dir), all of them, the best --max-first going on; without, a seeded sample."""
    from scoring import candidates_dir

    if candidates_dir(cfg) is None:
        return pnas.first_level(cfg.ops, cfg.max_first, cfg.seed), None
    first = pnas.first_level(cfg.ops)
    print(f"level 1: a screen of all {len(first)} one-block cells ({cfg.screen_iters} meta-iterations, "
          f"{min(cfg.screen_episodes, cfg.eval_episodes)} episodes); the best {cfg.max_first} and conv4 go on")
    return first, (cfg.max_first, {"meta_iters": cfg.screen_iters, "episodes": cfg.screen_episodes})


def say_best(cfg, best, verdict, seconds):
    """The search's last lines: the best cell, its scores, the verdict against conv4 and where the results are.
    A best cell with no re-score of its own (--rescore 0, or each one failed) carries its search score, trial 0."""
    print(f"best cell: {json.dumps(best['cell'])}")
    again = (f"re-scored on fresh episodes with new seeds {100 * best['rescore']['accuracy']:.2f}% "
             f"± {100 * best['rescore']['ci95']:.2f}%" if 0 not in best["rescore"]["scores"] else "not re-scored")
    if best["rescore"].get("failed"):
        again = "every re-score failed, so this search score stands for it"
    print(f"validation accuracy {100 * best['accuracy']:.2f}% ± {100 * best['ci95']:.2f}% in the search; {again} "
          f"(chance {100 / cfg.ways:.0f}%), {best['params']:,} parameters")
    print(verdict)
    print(f"results in {cfg.out}/: search.jsonl (every candidate), best.json (use with --train), "
          f"report.md with report.png and best_cell.png; {seconds:.0f} s")


def check_networks(cfg, log):
    """Refuse a log whose cells were scored as other networks (an older skeleton, another width): a cell's
    logged parameter count must be its count here."""
    from scoring import parameters

    for r in log.records.values():
        here = parameters(cfg, r["cell"])
        if r.get("params") is not None and r["params"] != here:
            raise ConfigError(f"{log.path} holds cell {json.dumps(r['cell'])} scored as a network of {r['params']:,} "
                              f"parameters, which has {here:,} here: it was written by an older autometa or with "
                              "other network settings; pass a new --out")


def check_best(cfg, log, score, measured, shared):
    """The noise floor (pnas.seed_noise) and the de-biased best (pnas.debiased_best); writes best.json."""
    noise = pnas.seed_noise(log.records.values())
    if noise is not None:
        spread = statistics.pstdev(r["accuracy"] for r in log.records.values() if r["level"] == 1
                                   and r["role"] in pnas.SEARCH_ROLES and r["status"] == "ok")
        print(f"seed noise: a score moves by {100 * noise:.2f} points (std) with the training seed; level-1 scores "
              f"spread by {100 * spread:.2f}")
    best = pnas.debiased_best(log, score, measured, cfg.rescore, cfg.rescore_seeds, **shared,
                              meta_iters=cfg.rescore_iters)
    write_json(os.path.join(cfg.out, "best.json"), {"cell": best["cell"], "accuracy": best["accuracy"],
                                                    "ci95": best["ci95"], "rescore": best["rescore"],
                                                    "params": best["params"], "skeleton": cells.SKELETON,
                                                    "config": config_dict(cfg)})
    return best


def run_train(cfg, arch_text):
    """The --train command, once per seed of --seeds; each run resumes from its last.pt when it exists."""
    import training

    arch = pnas.canonical(cells.load_arch(arch_text))  # one network, however its cell is written
    device = pick_device(cfg.device)
    training.parse_seeds(cfg.seeds or "0")  # a bad --seeds fails before any training
    for seed, run in training.seed_runs(cfg):
        if seed is not None:
            print(f"--- training seed {seed}: {run.out}")
        with hold(run.out), writing(run.out, "--out"):
            check_resume(run, "train")
            trainer = training.train(run, arch, data.splits_for(run, ("train", "val")), device)
        if trainer.iteration == run.train_iters and trainer.best is not None:
            print(f"best validation accuracy {100 * trainer.best['val_accuracy']:.2f}% at iteration "
                  f"{trainer.best['iteration']}; checkpoints in {run.out}/ (best.pt, last.pt), log in train.jsonl")
    return 0


def run_eval(args):
    """The --eval command: the standard protocol on fixed, seeded test episodes, for one checkpoint or
    for every seed of a --seeds folder (then their mean and spread across seeds)."""
    import training

    found = []
    for label, path in training.checkpoints(args.eval):
        state = training.load_checkpoint(path)
        cfg = make_config(flags(args), args.preset, base=state["config"])
        set_up_process(cfg, "eval")
        device = pick_device(cfg.device)
        print(f"{label + ': ' if label else ''}testing {path} on {cfg.eval_episodes} test episodes, {cfg.ways}-way "
              f"{cfg.shots}-shot, device {device}", flush=True)
        accuracy, ci95 = training.checkpoint_accuracy(cfg, state, data.splits_for(cfg, ("test",)), device)
        print(f"{label + ': ' if label else ''}test accuracy: {100 * accuracy:.2f}% ± {100 * ci95:.2f}% "
              f"(95% CI, {cfg.eval_episodes} episodes)")
        found.append((accuracy, ci95))
    if len(found) > 1:
        mean = statistics.mean(a for a, _ in found)
        print(f"mean over {len(found)} seeds: {100 * mean:.2f}% ± {100 * statistics.stdev(a for a, _ in found):.2f}% "
              f"(std across seeds; per-episode 95% CI of a seed about ± {100 * statistics.mean(c for _, c in found):.2f}%)")
    return 0


def run_inspect(cfg):
    """The --inspect command."""
    for line in data.describe(data.load_splits(cfg.data, cfg.image_size, data.cache_dir(cfg), seed=cfg.seed)):
        print(line)


def run_draw(arch_text, path):
    """The --draw command: a picture of a cell in any form load_arch reads."""
    if not path:
        raise ConfigError("--draw needs --out FILE.png, the file to write the picture to")
    if not path.lower().endswith(".png"):
        raise ConfigError(f"--out {path} is not a .png file: --draw writes a PNG, pass --out FILE.png")
    import drawing

    cell = cells.load_arch(arch_text)
    title = None if arch_text.lstrip().startswith("[") else os.path.basename(arch_text)
    with writing(path, "--out"):
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        drawing.draw_cell(cell, path, title)
    print(f"wrote {path}")


def run_bench(cfg, which, preset):
    """The --bench command: the workloads of docs/speed.md under this config (bench.py), or the objective's
    fidelity (fidelity.py)."""
    device = pick_device(cfg.device)
    if which == "objective":
        import fidelity

        fidelity.run(cfg, preset, data.splits_for(cfg), device)
        return
    import bench

    bench.run(cfg, data.splits_for(cfg, ("train", "val")), device, which)


def set_up_process(cfg, command):
    """Settings of the whole process, made here rather than in modules people copy, and only for the
    commands they were measured to help (docs/speed.md). CPU threads: a score depends on them, so a
    search fixes them (one per candidate unless --threads says otherwise). The allocator that keeps freed
    memory (fastcpu.reuse_freed_memory) for the commands that meta-train; --bench times with and without
    it. On CUDA, deterministic convolutions and matrix products, so that a seed gives the same log."""
    if command == "search" and not cfg.threads:
        cfg.threads = 1
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if command in ("search", "train"):
        import fastcpu

        fastcpu.reuse_freed_memory()
    if command in ("search", "train", "eval", "bench"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when CUDA's first matrix product runs
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


def command(args):
    """The command `args` names: 'search', 'inspect', 'train', 'eval', 'draw' or 'bench'."""
    return next(name for name in ("search", "inspect", "train", "eval", "draw", "bench")
                if getattr(args, name) not in (None, False))


def flags(args):
    """The Config fields given on the command line."""
    return {k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__}


def run(args):
    """Run the one command `args` names; returns the exit status."""
    if args.eval is not None:
        return run_eval(args)
    cfg = make_config(flags(args), args.preset)
    set_up_process(cfg, command(args))
    try:
        if args.search:
            run_search(cfg)
        elif args.inspect:
            run_inspect(cfg)
        elif args.train is not None:
            if args.out is None:
                cfg.out = train_out(args.train)
            return run_train(cfg, args.train)
        elif args.draw is not None:
            run_draw(args.draw, args.out)
        elif args.bench is not None:
            run_bench(cfg, args.bench, args.preset)
    except stops.Stopped as e:  # where the results are, for main's one line
        if args.search:
            e.where = f"every result so far is in {cfg.out}/search.jsonl: rerun the same command to resume"
        elif args.train is not None:
            e.where = (f"the checkpoints so far are in {cfg.out}: rerun the same command to resume from the "
                       "last one")
        raise
    return 0


def main(argv=None):
    """Parse flags, run one command; bad input exits 2 with one sentence, a stop signal ends in one line
    with 128 + its number (stops.py)."""
    args = make_parser().parse_args(argv)
    with stops.signals_raise():
        try:
            return run(args)
        except (ConfigError, data.DataError, cells.CellError, pnas.LogError, FolderError) as e:
            print(f"autometa: error: {e}", file=sys.stderr)
            return 2
        except pnas.SearchError as e:
            print(f"autometa: search failed: {e}", file=sys.stderr)
            return 1
        except stops.Stopped as e:
            print(e.line(), file=sys.stderr)
            if threading.active_count() > 1:  # a team's helper thread, still training a candidate
                stops.exit_now(e.status)
            return e.status


if __name__ == "__main__":
    sys.exit(main())
