"""Progressive neural architecture search (Liu et al., 2018, PNAS) with a tiny MLP-ensemble predictor.

A cell is plain data, a tuple of blocks ``(in1, op1, in2, op2)``: inputs 0 and 1 are the outputs of
the two previous cells, input 2 + i is block i of this cell, and a block computes op1(h[in1]) +
op2(h[in2]). The search scores every 1-block cell (or a sample), fits the predictor on (cell,
accuracy), then for b = 2..B expands the cells of the previous level by one block, ranks the children
with the predictor, scores the best `beam` of them and refits. What "score" means is the caller's:
``score(cell)`` returns at least ``{"accuracy": ...}``.

Every scored cell is appended at once to a JSONL log; rerunning with the same log resumes and scores
no cell twice. This file needs torch and numpy alone::

    ops = ["conv_3x3", "max_pool_3x3", "identity"]
    log = pnas.SearchLog("search.jsonl", levels=5, total=21 + 4 * 8)
    best = pnas.search(score, log, blocks=5, beam=8, ops=ops, first_cells=pnas.first_level(ops),
                       predictor=pnas.Predictor(5, ops))
"""
import itertools
import json
import os
import random
import time

import numpy as np
import torch
import torch.nn as nn


class LogError(ValueError):
    """search.jsonl cannot be read back; the message names the line and the fix."""


class SearchError(RuntimeError):
    """The search cannot go on (e.g. every candidate of a level failed)."""


# ---------------------------------------------------------------------------- the search space

def canonical(cell):
    """Order the two halves of every block so that symmetric duplicates compare equal."""
    return tuple(tuple(a + b) if a <= b else tuple(b + a)
                 for a, b in (((in1, op1), (in2, op2)) for in1, op1, in2, op2 in cell))


def expand(cell, ops):
    """Every canonical child of `cell` with one more block (105 one-block cells for 7 ops)."""
    choices = sorted((i, op) for i in range(len(cell) + 2) for op in ops)
    return [tuple(cell) + (a + b,) for a, b in itertools.combinations_with_replacement(choices, 2)]


def first_level(ops, sample=0, seed=0):
    """All 1-block cells, or a seeded sample of `sample` of them."""
    cells = expand((), ops)
    if sample and sample < len(cells):
        cells = sorted(random.Random(seed).sample(cells, sample))
    return cells


def cell_key(cell):
    """A stable string naming a cell up to symmetric halves (used for logs and seeds)."""
    return json.dumps([list(block) for block in canonical(cell)], separators=(",", ":"))


def as_cell(blocks):
    """A cell read back from JSON (lists) as a tuple of block tuples."""
    return tuple(tuple(block) for block in blocks)


# ---------------------------------------------------------------------------- the predictor

def encode(cell, max_blocks, ops):
    """Fixed-length vector for the predictor: the mean over blocks of one-hot [in1, op1, in2, op2].

    Averaging over blocks (as PNAS's MLP predictor does) lets what was learnt from b-block
    cells carry over to their (b+1)-block children.
    """
    n_inputs, ops = max_blocks + 1, list(ops)
    half = n_inputs + len(ops)
    vec = torch.zeros(2 * half)
    for in1, op1, in2, op2 in canonical(cell):
        for offset, (i, op) in ((0, (in1, op1)), (half, (in2, op2))):
            vec[offset + i] += 1.0 / len(cell)
            vec[offset + n_inputs + ops.index(op)] += 1.0 / len(cell)
    return vec


class Predictor:
    """An ensemble of small MLPs mapping encode(cell) to accuracy; the prediction is their mean."""

    def __init__(self, max_blocks, ops, members=5, hidden=64, epochs=300, lr=3e-3, seed=0):
        self.max_blocks, self.ops = max_blocks, list(ops)
        self.members, self.hidden, self.epochs, self.lr, self.seed = members, hidden, epochs, lr, seed
        self.models = []

    def _features(self, cells):
        return torch.stack([encode(c, self.max_blocks, self.ops) for c in cells])  # (n, d)

    def fit(self, cells, accuracies):
        """Train each member from its own seed on a bootstrap resample of the data."""
        x, y = self._features(cells), torch.tensor(accuracies, dtype=torch.float32)
        self.models = []
        with torch.random.fork_rng(devices=[]):
            for m in range(self.members):
                torch.manual_seed(self.seed * 1000 + m)
                rows = torch.randint(len(cells), (len(cells),)) if self.members > 1 else torch.arange(len(cells))
                model = nn.Sequential(nn.Linear(x.shape[1], self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))
                opt = torch.optim.Adam(model.parameters(), lr=self.lr)
                for _ in range(self.epochs):
                    loss = ((torch.sigmoid(model(x[rows])).squeeze(1) - y[rows]) ** 2).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                self.models.append(model)
        return self

    @torch.no_grad()
    def predict(self, cells):
        """Predicted accuracy of each cell, as a numpy array."""
        x = self._features(cells)
        return torch.stack([torch.sigmoid(m(x)).squeeze(1) for m in self.models]).mean(0).numpy()


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

def search(score, log, blocks, beam, ops, first_cells, predictor):
    """PNAS's progressive search; returns the log record of the best cell measured.

    `score(cell)` -> {"accuracy", ...}; `log` is a SearchLog, which scores, logs and resumes.
    """
    measured = log.level(1, first_cells, score)                     # score the 1-block cells
    for b in range(2, blocks + 1):
        predictor.fit([as_cell(r["cell"]) for r in measured], [r["accuracy"] for r in measured])
        parents = [as_cell(r["cell"]) for r in measured if r["level"] == b - 1]
        children = sorted({canonical(child) for p in parents for child in expand(p, ops)})
        predicted = dict(zip(children, predictor.predict(children).tolist()))
        ranked = sorted(children, key=lambda c: (-predicted[c], cell_key(c)))
        measured += log.level(b, ranked[:beam], score, predicted)   # score the beam
    return max(measured, key=lambda r: (r["accuracy"], -r["blocks"]))


def score_safely(score, cell):
    """Run score(cell); an exception inside it becomes a "failed" result, so one bad candidate
    (out of memory, say) does not end a long search. A result may carry its own status."""
    start = time.time()
    try:
        result = dict(score(cell))
        result.setdefault("status", "ok")
    except Exception as e:
        first_line = (str(e).splitlines() or [""])[0]
        result = dict(accuracy=None, ci95=None, status="failed", error=f"{type(e).__name__}: {first_line}")
    result["seconds"] = round(time.time() - start, 3)
    return result


def score_each(score, cells):
    """Score the cells one after another in this process, yielding (cell, result) as each finishes."""
    for cell in cells:
        yield cell, score_safely(score, cell)


class SearchLog:
    """The search's append-only log, OUT/search.jsonl: one JSON line per scored cell, written as each
    result arrives. Cells already in it are not scored again, which is how a rerun resumes.

    `levels` and `total` (cells to score) are the search's size, for the progress lines and the ETA;
    `score_cells(score, cells)` yields (cell, result) as results arrive (``score_each``, or a torchrun
    team's), `workers` of them at once; `on_level(b, records)` runs after each level with every record.
    """

    def __init__(self, path, levels, total, score_cells=score_each, workers=1, say=print, on_level=None):
        self.path, self.levels, self.total = path, levels, total
        self.score_cells, self.workers, self.say, self.on_level = score_cells, workers, say, on_level
        self.records = read_log(path)  # cell key -> record
        self.count, self.timed = 0, []

    def level(self, b, cells, score, predicted=None):
        """Score the cells of level b not yet logged; return the ok records of all `cells`, in their order."""
        start = time.time()
        logged = [(cell, None) for cell in cells if cell_key(cell) in self.records]
        missing = [cell for cell in cells if cell_key(cell) not in self.records]
        # the cells logged by an earlier run first, then each new result as soon as it arrives
        for i, (cell, result) in enumerate(itertools.chain(logged, self.score_cells(score, missing)), 1):
            if result is not None:
                p = None if predicted is None else round(predicted[canonical(cell)], 4)
                self.append(dict(level=b, cell=[list(x) for x in canonical(cell)], blocks=len(cell),
                                 predicted=p, **result))
            self.count += 1
            eta = np.mean(self.timed) * (self.total - self.count) / self.workers if self.timed else None
            self.say(progress_line(b, self.levels, i, len(cells), self.records[cell_key(cell)], eta,
                                   result is not None))
        ok = [self.records[cell_key(c)] for c in cells if self.records[cell_key(c)]["status"] == "ok"]
        if not ok:
            raise SearchError(f"no candidate of level {b} trained successfully: see {self.path} for each error")
        self.summarize(b, ok, time.time() - start)
        if self.on_level is not None:
            self.on_level(b, list(self.records.values()))
        return ok

    def append(self, record):
        """Append one record as a JSON line and make it durable before going on."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[cell_key(record["cell"])] = record
        self.timed.append(record["seconds"])

    def summarize(self, b, ok, seconds):
        """After a level: the predictor's Spearman correlation on it (PNAS's diagnostic), and its time."""
        if b > 1:
            rho = spearman([r["predicted"] for r in ok], [r["accuracy"] for r in ok])
            self.say(f"level {b}: Spearman rank correlation, predicted vs measured: "
                     + ("n/a" if rho is None else f"{rho:+.3f}") + f" ({len(ok)} cells)")
        self.say(f"level {b} done in {seconds:.1f} s")


def read_log(path):
    """Records of search.jsonl keyed by cell; a partial last line (from a kill) is cut off the file."""
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
        records[cell_key(record["cell"])] = record
    return records


def progress_line(level, blocks, i, n, record, eta, fresh=True):
    """One line per candidate: level, i/total, accuracy, seconds (or 'logged' when resumed), ETA of the search."""
    if record["status"] == "ok":
        result = f"acc {100 * record['accuracy']:5.2f}% ± {100 * record['ci95']:5.2f}%"
    else:
        result = f"{record['status']}: {record.get('error', '')}"
    seconds = f"{record['seconds']:6.1f} s" if fresh else "  logged"
    eta = "ETA     ? min" if eta is None else f"ETA {eta / 60:5.1f} min"
    return f"[level {level}/{blocks}] {i:>3}/{n}  {result}  {seconds}  {eta}  {json.dumps(record['cell'])}"
