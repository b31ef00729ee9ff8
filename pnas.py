"""Progressive neural architecture search (Liu et al., 2018, PNAS) with a tiny MLP-ensemble predictor.

A cell is plain data, a tuple of blocks ``(in1, op1, in2, op2)``: inputs 0 and 1 are the outputs of
the two previous cells, input 2 + i is block i of this cell, and a block computes op1(h[in1]) +
op2(h[in2]). Inside the search a cell is always its canonical tuple (``canonical``), one per network;
``cell_key`` names it as a string. The search scores every 1-block cell (or a sample), fits the
predictor on (cell, accuracy), then for b = 2..B expands the cells of the previous level by one
block, ranks the children with the predictor, scores the best `beam` of them and refits. What
"score" means is the caller's: ``score(cell)`` returns at least ``{"accuracy": ...}``.

Every scored cell is appended at once to a JSONL log; rerunning with the same log resumes and scores
no cell twice. This file needs torch and numpy alone::

    ops = ["conv_3x3", "max_pool_3x3", "identity"]
    log = pnas.SearchLog("search.jsonl")
    pnas.search(score, log, blocks=5, beam=8, ops=ops, first_cells=pnas.first_level(ops),
                predictor=pnas.Predictor(ops))
    best = pnas.best(log.records.values())
"""
import functools
import itertools
import json
import os
import random
import time

import numpy as np
import torch
import torch.nn as nn


# What each row of the log is. The first four are the search's own scores, one per network; the
# last three score a cell apart from them: at a cheaper fidelity, or again with another training seed.
ROLES = {
    "first": "a 1-block cell of level 1",
    "baseline": "a hand design scored at level 1 whatever the sample (conv4)",
    "beam": "a child the predictor (or the random sampler) chose",
    "probe": "a child drawn at random beside the beam, to measure the predictor",
    "screen": "a 1-block cell at a cheaper fidelity, to choose the level-1 cells the search scores",
    "noise": "a best level-1 cell again on the same episodes, another seed: its mean and the seed noise floor",
    "rescore": "a best cell again on fresh episodes: the de-biased best",
}
SEARCH_ROLES = ("first", "baseline", "beam", "probe")


class LogError(ValueError):
    """search.jsonl cannot be read back; the message names the line and the fix."""


class SearchError(RuntimeError):
    """The search cannot go on (e.g. every candidate of a level failed)."""


# ---------------------------------------------------------------------------- the search space

def canonical(cell):
    """The standard way to write a cell: all listings of one network (its blocks in another order,
    hence its outputs concatenated in another order, or a block's halves swapped) give one tuple.

    Blocks are sorted by (depth, signature). A block's signature is the expression it computes,
    e.g. ``conv_3x3(1) + max_pool_3x3(identity(0) + identity(1))``, its two halves sorted; its
    depth is one more than that of the deepest block it reads, so a block comes after the blocks
    it reads. Blocks of equal depth and signature are still distinct blocks (each has its own
    weights) that later blocks may read differently, so among the orders of such blocks the one
    giving the smallest tuple is taken. Halves are ordered (in, op) <= (in, op), as before. The op
    "none" contributes nothing and reads nothing: its half is written with its partner's input.
    """
    signature, depth = ["0", "1"], [0, 0]  # of the cell's two inputs, then of each block
    for in1, op1, in2, op2 in cell:
        reads = [i for i, op in ((in1, op1), (in2, op2)) if op != "none"]
        signature.append(" + ".join(sorted(half_signature(i, op, signature) for i, op in ((in1, op1), (in2, op2)))))
        depth.append(1 + max(depth[i] for i in reads))

    def rank(b):
        return depth[b + 2], signature[b + 2]

    # Signatures alone cannot tell "x(copy A) + y(copy B)" from "x(copy A) + y(copy A)"; trying
    # every order within each tie (one order unless blocks repeat) and keeping the smallest result
    # can, and any listing of the same network has the same ties, so it reaches the same minimum.
    ties = [tuple(group) for _, group in itertools.groupby(sorted(range(len(cell)), key=rank), key=rank)]
    orders = itertools.product(*(itertools.permutations(group) for group in ties))
    return min(renumber(cell, tuple(itertools.chain(*order))) for order in orders)


def half_signature(i, op, signature):
    """What one half of a block computes, e.g. 'conv_3x3(1)'; 'none' reads nothing."""
    return "none" if op == "none" else f"{op}({signature[i]})"


def renumber(cell, order):
    """`cell` with its blocks listed in `order` (old block indices), inputs renumbered to match and
    each block's halves sorted, a "none" half given its partner's input. `order` must list a block
    after the blocks it reads."""
    new = {0: 0, 1: 1, **{old + 2: position + 2 for position, old in enumerate(order)}}
    blocks = []
    for b in order:
        in1, op1, in2, op2 = cell[b]
        in1, in2 = new[in2 if op1 == "none" else in1], new[in1 if op2 == "none" else in2]
        first, second = sorted([(in1, op1), (in2, op2)])
        blocks.append(first + second)
    return tuple(blocks)


def expand(cell, ops):
    """Every child of `cell` with one more block, each distinct network once, canonical and sorted
    (119 one-block cells for the 7 ops and "none"; a block of two "none" halves is no block)."""
    choices = [(i, op) for i in range(len(cell) + 2) for op in ops]
    return sorted({canonical(tuple(cell) + (a + b,)) for a, b in itertools.combinations_with_replacement(choices, 2)
                   if not a[1] == b[1] == "none"})


def first_level(ops, sample=0, seed=0):
    """All 1-block cells, or a seeded sample of `sample` of them."""
    cells = expand((), ops)
    if sample and sample < len(cells):
        cells = sorted(random.Random(seed).sample(cells, sample))
    return cells


def cell_key(cell):
    """The string naming a canonical cell, hence its network (a log's key, a seed's name). Every cell is
    made canonical where it enters the program (read from a flag, a file or a log, or made by expand),
    so one network has one key."""
    return json.dumps([list(block) for block in cell], separators=(",", ":"))


def as_cell(blocks):
    """A cell read back from JSON (lists of lists) as a tuple of block tuples."""
    return tuple(tuple(block) for block in blocks)


# ---------------------------------------------------------------------------- the predictor

def encode(cell, ops):
    """Predictor features that mean the same for cells of any size: 4 + n + n(n+1)/2 numbers for n ops.

    Each block is described by what it is and the cell by the mean over its blocks, as PNAS averages
    its per-block embeddings, so that what was learnt on b-block cells carries over to their
    (b+1)-block children whatever the blocks' order or number. Per block: its two ops as an
    unordered pair (a one-hot over every pair, "none" included), which tells ``conv + pool,
    identity + sep`` from ``conv + identity, pool + sep``; and each op's share of its two halves,
    which still prices an op in a pair never measured (a search that samples its first cells
    measures few pairs). Pooled over the cell's halves that read an input (a "none" half reads
    nothing): the fraction reading a block of this cell (its kind, not its index, which a shallower
    cell never has), and of those reading the cell's inputs, the fraction reading the previous
    cell rather than the one two back. Last, 1 / block count and the longest chain / block count.

    [reads a block, reads k-1 | cell input, 1 / blocks, depth / blocks, op shares (n), pairs (n(n+1)/2)]
    """
    ops = list(ops)
    n = len(ops)
    # The previous cell's share is taken among the halves reading a cell input, so a half reading a
    # block leaves it unchanged: fitted on 1-block cells only, the predictor then values such a half
    # by its op alone. Over all halves instead, "cell k-2" and "cell k-1" add up to 1 on 1-block
    # cells, so the fit splits weight between them arbitrarily, and that split would price a block read.
    # Pooling over halves, rather than averaging each block's shares, weighs a block by the halves it
    # describes: a block reading no cell input has no previous-cell share to average.
    reads, from_cells, depth = 0, [], [0, 0]  # depth: of the cell's two inputs, then of each block
    features = [0.0] * (4 + n + n * (n + 1) // 2)
    for in1, op1, in2, op2 in cell:
        halves = [i for i, op in ((in1, op1), (in2, op2)) if op != "none"]
        reads += len(halves)
        from_cells += [i for i in halves if i < 2]  # never empty: block 0 reads only the cell's inputs
        depth.append(1 + max(depth[i] for i in halves))
        a, b = sorted((ops.index(op1), ops.index(op2)))
        features[4 + a] += 1 / (2 * len(cell))
        features[4 + b] += 1 / (2 * len(cell))
        features[4 + n + a * (2 * n - a + 1) // 2 + b - a] += 1 / len(cell)  # pair (a, b), a <= b, in row order
    features[:4] = [1 - len(from_cells) / reads, sum(from_cells) / len(from_cells), 1 / len(cell),
                    max(depth) / len(cell)]
    return torch.tensor(features)


class Predictor:
    """An ensemble of small MLPs mapping encode(cell) to accuracy; the prediction is their mean."""

    def __init__(self, ops, members=5, hidden=64, epochs=300, lr=3e-3, seed=0):
        self.ops = list(ops)
        self.members, self.hidden, self.epochs, self.lr, self.seed = members, hidden, epochs, lr, seed
        self.models = []

    def _encode(self, cells):
        return torch.stack([encode(c, self.ops) for c in cells])  # (n, d)

    def fit(self, cells, accuracies):
        """Train each member on all the data from its own initial weights: a deep ensemble. Bootstrap
        resamples would leave the one best cell of a level out of about a third of the members, which
        then rank its children below those of a crowd of lesser cells."""
        x, y = self._encode(cells), torch.tensor(accuracies, dtype=torch.float32)
        # Standardize the features on the training cells. One that never varied there (reading a
        # block, when only 1-block cells were measured) teaches nothing, so it is zeroed rather
        # than left to move predictions through weights that training never touched.
        std = x.std(0, unbiased=False)
        self.shift, self.scale = x.mean(0), torch.where(std > 1e-6, 1 / std.clamp(min=1e-6), torch.zeros_like(std))
        # The members output accuracy in standard units of the training accuracies: those of one
        # level lie in a narrow band, where a sigmoid output would learn their differences slowly.
        self.y_mean, self.y_std = y.mean(), y.std(unbiased=False)
        x = (x - self.shift) * self.scale
        self.models = []
        with torch.random.fork_rng(devices=[]):
            for m in range(self.members):
                torch.manual_seed(self.seed * 1000 + m)
                model = nn.Sequential(nn.Linear(x.shape[1], self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))
                opt = torch.optim.Adam(model.parameters(), lr=self.lr)
                for _ in range(self.epochs):
                    loss = ((self._accuracy(model, x) - y) ** 2).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                self.models.append(model)
        return self

    def _accuracy(self, model, x):
        return self.y_mean + self.y_std * model(x).squeeze(1)

    @torch.no_grad()
    def predict(self, cells):
        """Predicted accuracy of each cell, as a numpy array."""
        x = (self._encode(cells) - self.shift) * self.scale
        return torch.stack([self._accuracy(m, x) for m in self.models]).mean(0).numpy()


def spearman(a, b):
    """Spearman rank correlation (ties get their average rank); None for fewer than 3 pairs or a constant input."""
    if len(a) < 3:
        return None

    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # average the ranks of ties
            r[v == value] = r[v == value].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


# ---------------------------------------------------------------------------- the search

def search(score, log, blocks, beam, ops, first_cells, predictor, probes=0, sampler="predictor", seed=0,
           baseline=(), allowed=None, score_cells=None, progress=None, on_level=None, screen=None, noise=(0, 1)):
    """PNAS's progressive search (Algorithm 1); returns the log records of every cell it measured, in order.

    `score(cell)` -> {"accuracy", ...}; `log` is a SearchLog, which stores each result as it arrives,
    so a rerun with the same log resumes. Beside each level's beam, `probes` children drawn at random
    are scored too: the predictor chose none of them, so its rank correlation on them measures it
    without bias. `sampler="random"` picks the beam at random instead of by prediction: the baseline
    that shows what the predictor buys. `baseline`: 1-block cells scored at level 1 whatever
    `first_cells` holds (role "baseline"), the hand design a search must beat; they are parents like
    any other. `allowed(cell)`: whether a cell may be ranked and scored at all (a parameter budget,
    say); the baseline is scored regardless. `score_cells(score, cells)` scores a list of cells
    (default score_each, one after another here; a team's, in several processes), `progress` prints
    (a Progress), and `on_level(b, records)` runs after each level with every record of the log.
    `screen=(keep, options)`: successive halving at level 1. Every cell of `first_cells` is scored first
    by score(cell, **options), a cheaper fidelity (role "screen"), and only the best `keep` of them go on
    to score(cell) itself, beside the baseline. `noise=(n, seeds)`: right after level 1 its best n cells
    are scored again with training seeds 1..seeds-1 on the same episodes (role "noise", see settle); the
    mean of each one's scores stands for it from then on (in the predictor's data and among the finalists).
    """
    rng = random.Random(seed)
    allowed = allowed or (lambda cell: True)
    progress = progress or Progress(blocks, beam + probes)
    baseline = [canonical(c) for c in baseline]
    first = [c for c in map(canonical, first_cells) if c not in baseline and allowed(c)]
    if screen:                                                               # screen them, keep the best
        first = screened(log, score, first, *screen, score_cells=score_cells, progress=progress)
    first = [(c, "baseline") for c in baseline] + [(c, "first") for c in first]

    def measure(b, cells, predicted=None):
        ok = score_level(log, b, cells, score, score_cells, progress, predicted)
        if on_level is not None:
            on_level(b, list(log.records.values()))
        return ok

    measured = measure(1, first)                                             # score the 1-block cells
    measured = settle(log, score, measured, *noise, score_cells=score_cells, progress=progress)
    for b in range(2, blocks + 1):
        predictor.fit([r["cell"] for r in measured], [r["accuracy"] for r in measured])
        parents = [r["cell"] for r in measured if r["level"] == b - 1]
        children = sorted(c for c in {child for p in parents for child in expand(p, ops)} if allowed(c))
        if not children:
            progress.say(f"level {b}: no child of level {b - 1}'s cells is allowed (the parameter budget), so the "
                         f"search ends at level {b - 1}")
            break
        predicted = dict(zip(children, predictor.predict(children).tolist()))
        measured += measure(b, choose(children, predicted, beam, probes, sampler, rng), predicted)
    return measured


def screened(log, score, cells, keep, options, score_cells=None, progress=None):
    """The best `keep` of `cells` (sorted) by score(cell, **options), a cheaper fidelity logged as role "screen"."""
    cheap = rescore(log, score, cells, [0], "screen", score_cells=score_cells, progress=progress, **options)
    ranked = sorted(cells, key=lambda c: (-cheap[cell_key(c)][0]["accuracy"] if cheap[cell_key(c)] else 1,
                                          cell_key(c)))
    return sorted(ranked[:keep])


def choose(children, predicted, beam, probes, sampler, rng):
    """A level's (cell, role) pairs: the beam, the best `beam` children by prediction (or drawn at random with
    sampler "random"), and `probes` more drawn at random from the rest."""
    if sampler == "random":
        chosen = rng.sample(children, min(beam, len(children)))
    else:
        chosen = sorted(children, key=lambda c: (-predicted[c], cell_key(c)))[:beam]
    rest = [c for c in children if c not in set(chosen)]
    probed = rng.sample(rest, min(probes, len(rest)))
    return [(c, "beam") for c in chosen] + [(c, "probe") for c in probed]


def score_level(log, b, cells, score, score_cells=None, progress=None, predicted=None):
    """Score level b's (cell, role) pairs that the log has no result for (a failure is tried again),
    appending each result to the log as it arrives; return the ok records of all of them, in their order."""
    score_cells, progress = score_cells or score_each, progress or Progress(b, len(cells))
    start = time.time()
    roles = {cell: role for cell, role in cells if not log.done(cell)}
    progress.level(b, len(cells))
    for cell, role in cells:  # what an earlier run logged, first
        if cell not in roles:
            progress.scored(log.records[cell_key(cell)], fresh=False)
    for cell, result in score_cells(score, list(roles)) if roles else ():
        p = None if predicted is None else round(predicted[cell], 4)
        progress.scored(log.append(dict(level=b, cell=cell, blocks=len(cell), role=roles[cell], predicted=p,
                                        **result)))
    ok = [log.records[cell_key(c)] for c, _ in cells if log.records[cell_key(c)]["status"] == "ok"]
    if not ok:
        raise SearchError(f"no candidate of level {b} trained successfully: see {log.path} for each error")
    progress.level_done(b, ok, time.time() - start)
    return ok


def rescore(log, score, cells, trials, role, fresh=False, score_cells=None, progress=None, **options):
    """Score each cell again, once per training seed in `trials` (score(cell, trial=t, fresh=fresh,
    **options)), logged with `role`; returns {cell key: [ok records]}. Used for the level-1 screen (a
    cheaper fidelity), the noise floor (same episodes, other seeds) and the de-biased best (fresh
    episodes, other seeds). Each trial's cells go to `score_cells` together, so several processes
    share them."""
    score_cells, progress = score_cells or score_each, progress or Progress(1, 0)
    for trial in trials:
        todo = [c for c in cells if not log.done(c, role, trial)]
        for i, (cell, result) in enumerate(score_cells(score, todo, trial=trial, fresh=fresh, **options)
                                           if todo else (), 1):
            record = log.append(dict(level=len(cell), cell=cell, blocks=len(cell), role=role, trial=trial,
                                     predicted=None, **result))
            progress.scored(record, show=False)
            if len(trials) == 1:  # one line per cell as it comes (a screen is long); else a summary per cell below
                progress.say(f"{role} {i}/{len(todo)}: {outcome(record)}  {record['seconds']:6.1f} s  "
                             f"{json.dumps(cell)}")
    found = {}
    for cell in cells:
        found[cell_key(cell)] = [log.records[record_key(dict(cell=cell, role=role, trial=t))] for t in trials]
        if len(trials) > 1:
            progress.say(f"{role}: {json.dumps(cell)}: " + ", ".join(map(outcome, found[cell_key(cell)])))
    return {k: [r for r in rows if r["status"] == "ok"] for k, rows in found.items()}


def outcome(record):
    """A score as progress lines show it: its accuracy, or its status."""
    return f"{100 * record['accuracy']:.2f}%" if record["status"] == "ok" else record["status"]


def settle(log, score, measured, n, seeds, score_cells=None, progress=None):
    """Score the best `n` of `measured` (level 1's ok records) again with training seeds 1..`seeds`-1 on the
    same episodes (role "noise"); returns `measured` with each of those cells' accuracy the mean of its
    scores (the log keeps every score as it came). One seed's score ranks the level's close cells little
    better than chance (it moves about as much with the seed as the cells spread), and the predictor
    follows the cell that ranks first; the mean of 3 puts conv4 first where training does. Their spread
    is also the seed noise floor (seed_noise)."""
    top = sorted(measured, key=lambda r: (-r["accuracy"], cell_key(r["cell"])))[:n]
    again = rescore(log, score, [r["cell"] for r in top], list(range(1, seeds)), "noise", score_cells=score_cells,
                    progress=progress) if top and seeds > 1 else {}
    return [dict(r, accuracy=summary([r] + again[cell_key(r["cell"])])["accuracy"]) if cell_key(r["cell"]) in again
            else r for r in measured]


def debiased_best(log, score, measured, top, seeds, score_cells=None, progress=None, **options):
    """Re-score the `top` best measured cells with training seeds 1..`seeds` on fresh episodes
    (score(cell, trial=t, fresh=True, **options): `options` may set a longer training, the final choice's
    fidelity), the baseline's cells (role "baseline") beside them, and return best(log.records.values()).
    The search's own best score is the highest of many noisy ones, on the episodes that chose it, so it is
    biased upward; the re-score is not. With top 0 nothing is re-scored and the search's best keeps its
    own score."""
    if top:
        ranked = sorted(measured, key=lambda r: (-r["accuracy"], r["blocks"]))
        candidates = ranked[:top] + [r for r in ranked[top:] if r["role"] == "baseline"]
        rescore(log, score, [r["cell"] for r in candidates], list(range(1, seeds + 1)), "rescore", fresh=True,
                score_cells=score_cells, progress=progress, **options)
    return best(log.records.values())


def rescores(records):
    """cell key -> its re-score on fresh episodes with new seeds (role "rescore"), {"accuracy": mean,
    "ci95": of the mean, "seeds"}, for every cell re-scored; None where each of its re-scores failed."""
    found = {}
    for r in records:
        if r["role"] == "rescore":
            found.setdefault(cell_key(r["cell"]), []).extend([r] if r["status"] == "ok" else [])
    return {key: summary(rows) if rows else None for key, rows in found.items()}


def summary(rows):
    """The mean accuracy of some scores of one cell, the 95% CI of that mean, and each score with its
    trial (training seed number)."""
    cis = [x.get("ci95") for x in rows]  # a score may come without one
    return {"accuracy": round(float(np.mean([x["accuracy"] for x in rows])), 5),
            "ci95": None if None in cis else round(float(np.sqrt(sum(c ** 2 for c in cis))) / len(rows), 5),
            "seeds": [x.get("seed") for x in rows], "scores": {x.get("trial", 0): x["accuracy"] for x in rows}}


def best(records):
    """The search's best cell, by the one rule best.json, the report and the final message share: among
    the cells re-scored (role "rescore"), the best re-score (a cell whose every re-score failed counts
    its own search score, biased upward, and its "rescore" says so with "failed": True); with none
    re-scored yet, the best search score. On a tie, fewer blocks, then the better search score. Returns
    its record with "rescore" added (its summary), or None when no cell of the search trained."""
    ok = sorted((r for r in records if r["role"] in SEARCH_ROLES and r["status"] == "ok"),
                key=lambda r: (-r["accuracy"], r["blocks"]))
    again = rescores(records)
    pool = [r for r in ok if cell_key(r["cell"]) in again] or ok
    pool = [dict(r, rescore=again.get(cell_key(r["cell"])) or dict(summary([r]), failed=cell_key(r["cell"]) in again))
            for r in pool]
    return max(pool, key=lambda r: (r["rescore"]["accuracy"], -r["blocks"]), default=None)


def seed_noise(records):
    """The standard deviation of a score between training seeds, pooled over the cells scored with
    several seeds on the same episodes (role "noise" beside the search's own score); None if none."""
    by_cell = {}
    for r in records:
        if r["status"] == "ok" and r["role"] in SEARCH_ROLES + ("noise",):
            by_cell.setdefault(cell_key(r["cell"]), []).append(r["accuracy"])
    spreads = [np.var(scores, ddof=1) for scores in by_cell.values() if len(scores) > 1]
    return float(np.sqrt(np.mean(spreads))) if spreads else None


def score_safely(score, cell):
    """Run score(cell); an exception inside it becomes a "failed" result, so one bad candidate
    (out of memory, say) does not end a long search. A result may carry its own status. A SearchError
    is the scorer saying that no candidate can be scored any more: it ends the search."""
    start = time.time()
    try:
        result = dict(score(cell))
        result.setdefault("status", "ok")
    except SearchError:
        raise
    except Exception as e:
        first_line = (str(e).splitlines() or [""])[0]
        result = dict(accuracy=None, ci95=None, status="failed", error=f"{type(e).__name__}: {first_line}")
    result["seconds"] = round(time.time() - start, 3)
    return result


def score_each(score, cells, **options):
    """Score the cells one after another in this process (score(cell, **options)), yielding (cell, result)
    as each finishes."""
    for cell in cells:
        yield cell, score_safely(functools.partial(score, **options), cell)


# ---------------------------------------------------------------------------- progress

class Progress:
    """The search's progress lines: one per candidate with the search's ETA, and a summary after each level.

    It knows the search's size: `blocks` levels, the cells of level 1 (counted when it starts), at most
    `per_level` cells at each later level, and `after` re-scores once the levels are done; `workers`
    candidates are scored at once."""

    def __init__(self, blocks, per_level, after=0, workers=1, say=print):
        self.blocks, self.per_level, self.after, self.workers, self.say = blocks, per_level, after, workers, say
        self.total, self.count, self.timed = None, 0, []
        self.b = self.i = self.n = 0

    def level(self, b, n):
        """Level b starts, with n cells to score or read back from the log."""
        if self.total is None:
            self.total = n + self.per_level * (self.blocks - b) + self.after
        self.b, self.i, self.n = b, 0, n

    def scored(self, record, fresh=True, show=True):
        """A record arrived: scored now (`fresh`) or read back from the log; `show`: print its line."""
        if fresh:
            self.timed.append(record["seconds"])
        if not show:
            return
        self.i += 1
        self.count += 1
        left = max((self.total or self.count) - self.count, 0)
        eta = sum(self.timed) / len(self.timed) * left / self.workers if self.timed else None
        self.say(progress_line(self.b, self.blocks, self.i, self.n, record, eta, fresh))

    def level_done(self, b, ok, seconds):
        """After a level: the predictor's Spearman correlation on it (PNAS's diagnostic), and its time."""
        if b > 1:
            for name, rows in (("beam and probes", ok), ("probes alone", [r for r in ok if r["role"] == "probe"])):
                rho = spearman([r["predicted"] for r in rows], [r["accuracy"] for r in rows])
                self.say(f"level {b}: Spearman rank correlation, predicted vs measured, {name}: "
                         + ("n/a" if rho is None else f"{rho:+.3f}") + f" ({len(rows)} cells)")
        self.say(f"level {b} done in {seconds:.1f} s")


def progress_line(level, blocks, i, n, record, eta, fresh=True):
    """One line per candidate: level, i/total, accuracy, seconds (or 'logged' when resumed), ETA of the search."""
    if record["status"] == "ok":
        result = f"acc {100 * record['accuracy']:5.2f}%" + (
            f" ± {100 * record['ci95']:5.2f}%" if record.get("ci95") is not None else "")
    else:
        result = f"{record['status']}: {record.get('error', '')}"
    seconds = f"{record['seconds']:6.1f} s" if fresh else "  logged"
    eta = "ETA     ? min" if eta is None else f"ETA {eta / 60:5.1f} min"
    return f"[level {level}/{blocks}] {i:>3}/{n}  {result}  {seconds}  {eta}  {json.dumps(record['cell'])}"


# ---------------------------------------------------------------------------- the log

class SearchLog:
    """The search's append-only log, OUT/search.jsonl: one JSON line per scored cell, written as each
    result arrives, and read back into `records` (record_key -> record, each cell a canonical tuple).
    The search scores no cell that has a result here, which is how a rerun resumes."""

    def __init__(self, path):
        self.path = path
        self.records = read_log(path)

    def done(self, cell, role=None, trial=0):
        """Whether `cell` (re-scored as `role`, `trial`) has a result to keep: a failure (an exception, out of
        memory) is tried again."""
        record = self.records.get(record_key(dict(cell=cell, role=role, trial=trial)))
        return record is not None and record["status"] != "failed"

    def append(self, record):
        """Append one record as a JSON line and make it durable before going on; returns the record."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[record_key(record)] = record
        return record


def read_log(path):
    """Records of search.jsonl keyed by record_key, each cell read back as its canonical tuple; a partial
    last line (from a kill) is cut off the file.

    One record per network: a later row replaces an earlier one only where that one failed (the
    cell was tried again). A log written before cells were merged up to block order may hold one
    network twice: its first row is kept. A row from before roles were logged gets the role its level
    gives it ("first" or "beam")."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    good = data[:data.rfind(b"\n") + 1]  # everything up to the last complete line
    if len(good) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(good))
    records = {}
    for n, line in enumerate(good.decode().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LogError(f"line {n} of {path} is not valid JSON ({e.msg}): delete that line or start a new "
                           "--out folder") from e
        if not (isinstance(record, dict) and {"cell", "level", "status"} <= set(record)):
            raise LogError(f"line {n} of {path} is not a search record (an object with cell, level and status): "
                           "delete that line or start a new --out folder")
        record["cell"] = canonical(as_cell(record["cell"]))
        if record.get("role") is None:
            record["role"] = "first" if record["level"] == 1 else "beam"
        key = record_key(record)
        if key not in records or records[key]["status"] == "failed":
            records[key] = record
    return records


def record_key(record):
    """What a log record is the result of: its network, and for a re-score its role and trial."""
    if record.get("role") in SEARCH_ROLES + (None,):
        return cell_key(record["cell"])
    return f"{cell_key(record['cell'])}#{record['role']}{record['trial']}"
