"""What a search or a training run reports: its pictures and report.md (drawing.py draws them).

    draw_search(records, path, chance)  accuracy of every scored cell by level; predicted vs measured accuracy
    draw_training(history, path)        loss and train/validation accuracy by iteration
    write_report(out, records, config)  OUT/report.png, OUT/best_cell.png and OUT/report.md from search.jsonl

Everything is derived from the log records of search.jsonl (see pnas.search) and the config dict.
"""
import json
import math
import statistics
import os

from PIL import Image, ImageDraw

from drawing import (BLUE, GREEN, INK, MUTED, ORANGE, PALETTE, RED, SMALL_SIZE, TEXT_SIZE, TITLE_SIZE, WHITE, Axes,
                     dashed, dot, draw_cell, font, legend, save_png, value_ticks)
from files import atomic_write
import pnas
from pnas import SEARCH_ROLES, cell_key, seed_noise, spearman

SEARCH_SIZE = (1280, 570)    # report.png
TRAINING_SIZE = (1280, 570)  # train.png


def percent(fraction, digits=2):
    """0.6123 -> '61.23%'."""
    return f"{100 * fraction:.{digits}f}%"


def duration(seconds):
    """Seconds as '42 s', '5.2 min' or '1.3 h'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------- the search



def searched(records):
    """The rows of the search itself, without the re-scores of its noise floor and of its best cells."""
    return [r for r in records if r.get("role") in SEARCH_ROLES]


def draw_search(records, path, chance):
    """report.png: measured accuracy of every scored cell by level, and the predictor's predictions vs them."""
    image = Image.new("RGB", SEARCH_SIZE, WHITE)
    draw = ImageDraw.Draw(image)
    screens = [r for r in records if r.get("role") == "screen" and r["status"] == "ok"]
    noise, best, again, records = seed_noise(records), pnas.best(records), pnas.rescores(records), searched(records)
    ok = [r for r in records if r["status"] == "ok"]
    failed = len(records) - len(ok)
    header = f"{len(records)} cells scored" + (f" ({failed} diverged or failed)" if failed else "")
    if best is not None:
        header += (f"  ·  best {percent(best['accuracy'])} ± {percent(best['ci95'])} at level {best['level']}"
                   + (f" (re-scored {percent(best['rescore']['accuracy'])})"
                      if again.get(cell_key(best["cell"])) else "")
                   + f"  ·  chance {percent(chance, 0)}")
    if noise is not None:
        header += f"  ·  seed noise ± {percent(noise)} (std)"
    draw.text((20, 12), header, font=font(TITLE_SIZE), fill=INK)
    plot_levels(image, (95, 130, 640, 470), records, chance, screens)
    plot_predictions(image, (780, 130, 1085, 470), ok)
    save_png(image, path)


def plot_levels(image, box, records, chance, screens=()):
    """Left panel: each level's scored cells sorted by accuracy, with 95% CIs, the best of each level and chance;
    level 1's screen (`screens`, its ok rows) as small grey dots behind them."""
    levels = sorted({r["level"] for r in records})
    ok = [r for r in records if r["status"] == "ok"]
    bounds = [chance] + [r["accuracy"] + s * r["ci95"] for r in ok for s in (-1, 1)] + [r["accuracy"] for r in screens]
    yticks, ylim = value_ticks(100 * min(bounds), 100 * max(bounds), clip=(0, 100))
    ax = Axes(image, box, (levels[0] - 0.5, levels[-1] + 0.5), ylim)
    ax.frame("Measured accuracy of every scored cell", "search level (= blocks per cell)",
             "validation accuracy (%)", [(b, level_label(b, records, len(screens))) for b in levels], yticks)
    conv4 = baseline_of(ok)
    legend(ax.draw, box[0], box[1] - 28, [("dot", BLUE, "scored cell, ± 95% CI"), ("dot", GREEN, "probe"),
                                          ("dot", ORANGE, "best of level")]
           + ([("dot", MUTED, "screened")] if screens else [])
           + [("dash", MUTED, f"chance ({percent(chance, 0)})")]
           + ([("dash", RED, f"conv4 in this space ({percent(conv4['accuracy'], 1)})")] if conv4 else []))
    y_chance = ax.px(0, 100 * chance)[1]
    dashed(ax.draw, (box[0], y_chance), (box[2], y_chance), MUTED)
    if conv4:
        y_conv4 = ax.px(0, 100 * conv4["accuracy"])[1]
        dashed(ax.draw, (box[0], y_conv4), (box[2], y_conv4), RED)
    for i, r in enumerate(sorted(screens, key=lambda r: r["accuracy"])):  # behind level 1's own scores
        dot(ax.draw, ax.px(1 - 0.3 + 0.6 * i / max(len(screens) - 1, 1), 100 * r["accuracy"]), MUTED, radius=2)
    bests = []
    for b in levels:
        level = sorted((r for r in ok if r["level"] == b), key=lambda r: r["accuracy"])
        # Spread a level's cells across its column in order of accuracy: the column reads as a ranking.
        for i, r in enumerate(level):
            x = b if len(level) == 1 else b - 0.3 + 0.6 * i / (len(level) - 1)
            low, high = ax.px(x, 100 * (r["accuracy"] - r["ci95"])), ax.px(x, 100 * (r["accuracy"] + r["ci95"]))
            ax.draw.line([low, high], fill=(160, 195, 225), width=2)
            dot(ax.draw, ax.px(x, 100 * r["accuracy"]), GREEN if r.get("role") == "probe" else BLUE, radius=4)
        if level:
            bests.append(ax.px(b + 0.3 if len(level) > 1 else b, 100 * level[-1]["accuracy"]))
    if len(bests) > 1:
        ax.draw.line(bests, fill=ORANGE, width=2)
    for p in bests:
        dot(ax.draw, p, ORANGE, radius=7, outline=INK)


def level_label(b, records, screened=0):
    """The x-axis label of level b: what was scored there (and how many failed)."""
    n = sum(r["level"] == b for r in records)
    n_ok = sum(r["level"] == b and r["status"] == "ok" for r in records)
    probes = sum(r["level"] == b and r.get("role") == "probe" for r in records)
    kept = f"beam of {n - probes}" + (f" + {probes} probes" if probes else "")
    if b == 1:
        kept = f"{n} scored" + (f" of {screened} screened" if screened else "")
    return f"level {b}\n{kept}" + (f", {n - n_ok} failed" if n_ok < n else "")


def baseline_of(records):
    """The ok record of conv4 in this space (role "baseline"), or None."""
    return next((r for r in records if r.get("role") == "baseline" and r["status"] == "ok"), None)


def plot_predictions(image, box, ok):
    """Right panel: predicted vs measured accuracy of the cells of each level > 1, with Spearman's rho per level."""
    predicted = [r for r in ok if r.get("predicted") is not None]
    values = [100 * r[k] for r in predicted for k in ("accuracy", "predicted")] or [0, 100]
    ticks, lim = value_ticks(min(values), max(values), clip=(0, 100))
    ax = Axes(image, box, lim, lim)
    ax.frame("Predictor: predicted vs measured accuracy", "predicted accuracy (%)", "measured accuracy (%)",
             ticks, ticks)
    if not predicted:
        ax.draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), "predictions start at level 2",
                     font=font(TEXT_SIZE), fill=MUTED, anchor="mm")
        return
    dashed(ax.draw, ax.px(lim[0], lim[0]), ax.px(lim[1], lim[1]), MUTED)
    x, y = box[2] + 18, box[1]
    legend(ax.draw, x, y, [("dash", MUTED, "predicted = measured")])
    for k, b in enumerate(sorted({r["level"] for r in predicted})):
        level = [r for r in predicted if r["level"] == b]
        color = PALETTE[4 + k % (len(PALETTE) - 4)]  # blue, orange, green and red already mean something on the left
        for r in level:
            dot(ax.draw, ax.px(100 * r["predicted"], 100 * r["accuracy"]), color, radius=5)
        rho = spearman([r["predicted"] for r in level], [r["accuracy"] for r in level])
        y += 44
        legend(ax.draw, x, y, [("dot", color, f"level {b}: rho = " + ("n/a" if rho is None else f"{rho:+.2f}"))])
        ax.draw.text((x + 30, y + 19), f"Spearman, {len(level)} cells", font=font(SMALL_SIZE), fill=MUTED)


# ---------------------------------------------------------------------------- training

def draw_training(history, path, chance=None):
    """train.png: loss (left) and train/validation accuracy (right) by iteration, from one dict per logged iteration."""
    # Each dict: 'iteration', 'loss', 'train_accuracy' (a fraction), optionally 'val_accuracy' (None or missing
    # where not measured) and 'seconds' (elapsed since the start). A non-finite loss is left out of the line.
    image = Image.new("RGB", TRAINING_SIZE, WHITE)
    draw = ImageDraw.Draw(image)
    its = [h["iteration"] for h in history]
    loss = [h["loss"] if math.isfinite(h["loss"]) else None for h in history]
    train = [100 * h["train_accuracy"] for h in history]
    val = [None if h.get("val_accuracy") is None else 100 * h["val_accuracy"] for h in history]
    draw.text((20, 12), training_header(history, its, val), font=font(TITLE_SIZE), fill=INK)
    xaxis = value_ticks(min(its), max(its), pad=0)
    markers = len(history) <= 40
    plot_loss(image, xaxis, its, loss, markers)
    plot_accuracy(image, xaxis, its, train, val, chance, markers)
    save_png(image, path)


def training_header(history, its, val):
    """The line above the plots: iterations, last loss, best validation accuracy and elapsed time."""
    header = f"iterations {its[0]}-{its[-1]}  ·  last loss {history[-1]['loss']:.3f}"
    measured = [(v, i) for v, i in zip(val, its) if v is not None]
    if measured:
        best, at = max(measured)
        header += f"  ·  best validation accuracy {best:.2f}% at iteration {at}"
    if history[-1].get("seconds") is not None:
        header += f"  ·  {duration(history[-1]['seconds'])}"
    return header


def plot_loss(image, xaxis, its, loss, markers):
    """Left panel: the loss by iteration; `xaxis` is the (ticks, limits) pair both panels share."""
    xticks, xlim = xaxis
    finite = [v for v in loss if v is not None] or [0.0]
    yticks, ylim = value_ticks(min(finite), max(finite))
    ax = Axes(image, (95, 130, 610, 470), xlim, ylim)
    ax.frame("Loss", "iteration", "loss", xticks, yticks)
    legend(ax.draw, 95, 102, [("line", RED, "meta-training loss")])
    ax.series(its, loss, RED, markers=markers)


def plot_accuracy(image, xaxis, its, train, val, chance, markers):
    """Right panel: train accuracy, validation accuracy where measured, and chance if given."""
    xticks, xlim = xaxis
    measured = [v for v in val if v is not None]
    bounds = train + measured + ([100 * chance] if chance else [])
    yticks, ylim = value_ticks(min(bounds), max(bounds), clip=(0, 100))
    ax = Axes(image, (740, 130, 1255, 470), xlim, ylim)
    ax.frame("Few-shot accuracy", "iteration", "accuracy (%)", xticks, yticks)
    entries = [("line", BLUE, "train episodes")] + ([("dot", ORANGE, "validation episodes")] if measured else [])
    if chance:
        entries.append(("dash", MUTED, f"chance ({percent(chance, 0)})"))
        y = ax.px(xlim[0], 100 * chance)[1]
        dashed(ax.draw, (740, y), (1255, y), MUTED)
    legend(ax.draw, 740, 102, entries)
    ax.series(its, train, BLUE, markers=markers)
    ax.series(its, val, ORANGE, markers=True)



# ---------------------------------------------------------------------------- the report

def write_report(out, records, config):
    """OUT/report.png, OUT/best_cell.png and OUT/report.md from the search log records and the config dict."""
    search = searched(records)
    ok = sorted((r for r in search if r["status"] == "ok"), key=lambda r: (-r["accuracy"], r["blocks"]))
    levels = sorted({r["level"] for r in search})
    chance = 1 / config["ways"]
    draw_search(records, os.path.join(out, "report.png"), chance)
    lines = report_header(search, ok, levels, config, chance)
    best = pnas.best(records)  # the rule best.json and the final message follow too
    if best is not None:
        draw_cell(best["cell"], os.path.join(out, "best_cell.png"),
                  f"best cell: {percent(best['accuracy'])} ± {percent(best['ci95'])} (level {best['level']}, "
                  f"{best['params']:,} parameters)")
        rescore_iters = config.get("rescore_iters") or config["meta_iters"]  # a log from before it was a setting
        lines += best_cells_table(ok, pnas.rescores(records), rescore_iters) + [against_baseline(best, records), ""]
    lines += levels_table(search, levels, seed_noise(records)) + screen_lines(records)
    lines += report_footer(search, ok, config)
    atomic_write(os.path.join(out, "report.md"), lambda f: f.write("\n".join(lines).encode()))


def report_header(records, ok, levels, config, chance):
    """report.md's title, the one-line summary of the search and its setup, and the search picture."""
    return ["# Search report", "",
            f"Levels finished: {levels[-1] if levels else 0} of {config['blocks']}  ·  {len(records)} cells scored "
            f"({len(records) - len(ok)} diverged or failed)  ·  {config['ways']}-way {config['shots']}-shot on "
            f"{config['data']} ({config['image_size']}x{config['image_size']}), chance {percent(chance, 0)}  ·  "
            f"{config['meta_iters']} meta-iterations per cell, validation on {config['eval_episodes']} episodes", "",
            "![accuracy by level and predicted vs measured accuracy](report.png)", ""]


def best_cells_table(ok, again, rescore_iters):
    """The five best cells by search score as a markdown table (`ok` sorted best first, `again`:
    pnas.rescores; `rescore_iters`: the re-scores' meta-iterations), and the best cell's picture."""
    lines = ["## Best cells", "", "The search's own score of its best cells is the highest of many noisy scores, on "
             "the episodes that chose them; the re-score (mean over new training seeds, on fresh validation "
             f"episodes, each trained {rescore_iters} meta-iterations) is not, and it chooses best.json's cell.", "",
             "| rank | blocks | search's validation accuracy ± 95% CI | re-scored | parameters | cell |",
             "|---:|---:|---|---|---:|---|"]
    for k, r in enumerate(ok[:5], 1):
        rescore = again.get(cell_key(r["cell"]))
        lines.append(f"| {k} | {r['blocks']} | {percent(r['accuracy'])} ± {percent(r['ci95'])} | "
                     f"{'–' if rescore is None else percent(rescore['accuracy'])} | {r['params']:,} | "
                     f"`{json.dumps(r['cell'])}` |")
    return lines + ["", "![the best cell](best_cell.png)", ""]


def against_baseline(best, records):
    """The verdict of report.md and of the search's final message: the best cell (pnas.best) against conv4
    in this space, both re-scored on the same fresh episodes (or, before any re-score, both as searched)."""
    conv4 = baseline_of(records)
    if conv4 is None:
        return ("conv4 in this space: not scored (it failed to train, or the log predates it), so the best cell is "
                "compared with nothing.")
    again = pnas.rescores(records).get(cell_key(conv4["cell"]))
    line = (f"conv4 in this space: {percent(conv4['accuracy'])} ± {percent(conv4['ci95'])} in the search"
            + (f", re-scored {percent(again['accuracy'])}" if again else "") + f" ({conv4['params']:,} parameters).")
    if cell_key(best["cell"]) == cell_key(conv4["cell"]):
        return line + " The best cell is conv4 itself: no searched cell beat it."
    if best["rescore"].get("failed"):
        return (line + " Every re-score of the best cell failed, so its search score, biased upward, stands for it: "
                f"it {against_conv4(best['accuracy'], (again or conv4)['accuracy'])}.")
    if again:
        return (line + f" The best cell, re-scored on the same episodes, "
                f"{against_conv4(best['rescore']['accuracy'], again['accuracy'])}{separation(best['rescore'], again)}.")
    return line + f" The best cell, in the search, {against_conv4(best['accuracy'], conv4['accuracy'])}."


def separation(best, conv4):
    """Whether the best cell's re-scores separate it from conv4's, trial by trial (the same training seeds
    and episodes with common draws): the mean gap against twice its standard error over the trials."""
    trials = sorted(set(best["scores"]) & set(conv4["scores"]))
    gaps = [100 * (best["scores"][t] - conv4["scores"][t]) for t in trials]
    if len(gaps) < 2:
        return ", on one re-score, which cannot separate it from conv4"
    mean, error = statistics.mean(gaps), statistics.stdev(gaps) / math.sqrt(len(gaps))
    if abs(mean) > 2 * error:
        return f" (gap {mean:+.2f} ± {error:.2f} over {len(gaps)} re-scores: separated from conv4)"
    return (f"; over {len(gaps)} re-scores the gap is {mean:+.2f} ± {error:.2f} points (± one standard error), which "
            "does not separate it from conv4")


def against_conv4(best, conv4):
    """'beat it by ...' or 'did not beat it ...', from two accuracies."""
    gap = 100 * (best - conv4)
    return f"beat it by {gap:.2f} points" if gap > 0 else f"did not beat it ({-gap:.2f} points below)"


def levels_table(records, levels, noise):
    """One markdown row per level: cells, best, mean and spread of accuracy, Spearman rho, training time."""
    lines = ["## Levels", "", "At level 1 the scored cells are 1-block cells; at every later level they are the beam "
             "chosen among the children of the previous level, and probes drawn from the rest at random. The "
             "predictor chose no probe, so its Spearman ρ on the probes measures it without bias.", "",
             "Seed noise: " + ("not measured" if noise is None else f"a cell's score moves by {percent(noise)} (std) "
                               "with its training seed alone") + "; compare it with each level's spread.", "",
             "| level | cells scored | ok | best | mean | spread (std) | Spearman ρ, beam and probes | ρ, probes alone "
             "| training time |", "|---:|---:|---:|---|---|---|---|---|---:|"]
    below = []  # levels whose spread of scores is under the seed noise
    for b in levels:
        level = [r for r in records if r["level"] == b]
        good = [r for r in level if r["status"] == "ok"]
        scores = [r["accuracy"] for r in good]
        spread = math.sqrt(sum((a - sum(scores) / len(scores)) ** 2 for a in scores) / len(scores)) if good else None
        lines.append(f"| {b} | {len(level)} | {len(good)} | {percent(max(scores)) if good else '–'} | "
                     f"{percent(sum(scores) / len(scores)) if good else '–'} | "
                     f"{'–' if spread is None else percent(spread)} | {rho_text(good, b)} | "
                     f"{rho_text([r for r in good if r.get('role') == 'probe'], b)} | "
                     f"{duration(sum(r['seconds'] for r in level))} |")
        if noise is not None and spread is not None and len(good) > 1 and spread < noise:
            below.append(b)
    if below:
        lines += ["", f"At level{'s' if len(below) > 1 else ''} {', '.join(map(str, below))} the cells' scores spread less "
                  "than the seed noise: their order there is mostly noise, so neither the ranking nor Spearman's ρ "
                  "can be read from single scores."]
    return lines


def screen_lines(records):
    """report.md's account of level 1's screen (successive halving), when the search had one."""
    screens = {cell_key(r["cell"]): r for r in records if r.get("role") == "screen"}
    if not screens:
        return []
    ok = sorted((r for r in screens.values() if r["status"] == "ok"), key=lambda r: -r["accuracy"])
    kept = [r for r in records if r.get("role") == "first" and cell_key(r["cell"]) in screens]
    cut = min((screens[cell_key(r["cell"])]["accuracy"] for r in kept), default=None)
    full = [(screens[cell_key(r["cell"])]["accuracy"], r["accuracy"]) for r in kept if r["status"] == "ok"]
    rho = spearman([a for a, _ in full], [b for _, b in full]) if len(full) > 2 else None
    lines = ["", "## Level 1's screen", "",
             f"All {len(screens)} one-block cells were first scored at {ok[0]['meta_iters'] if ok else '?'} "
             f"meta-iterations ({len(screens) - len(ok)} failed); the best {len(kept)} trained on from there to the "
             f"full objective" + (f" (screen scores from {percent(ok[0]['accuracy'])} down to {percent(cut)})"
                                  if ok and cut is not None else "") + "."]
    if rho is not None:
        lines.append(f"Spearman ρ between their screen and full scores: {rho:+.2f} ({len(full)} cells).")
    return lines + [""]


def rho_text(rows, level):
    """Spearman rho of predicted vs measured accuracy over `rows`, as table text."""
    if level == 1:
        return "no predictions at level 1"
    rho = spearman([r["predicted"] for r in rows], [r["accuracy"] for r in rows])
    return "n/a" if rho is None else f"{rho:+.3f} ({len(rows)} cells)"


def report_footer(records, ok, config):
    """Spearman rho over every predicted cell, the total training time, and the config as JSON."""
    predicted = [r for r in ok if r.get("predicted") is not None]
    rho = spearman([r["predicted"] for r in predicted], [r["accuracy"] for r in predicted])
    return ["", f"Spearman ρ over every predicted cell: {'n/a' if rho is None else f'{rho:+.3f}'} "
            f"({len(predicted)} cells). Training time is the sum of the cells' meta-training and evaluation "
            f"seconds: {duration(sum(r['seconds'] for r in records))} in all.", "",
            "## Config", "", "```json", json.dumps(config, indent=2), "```", ""]
