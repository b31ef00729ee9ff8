"""Progressive architecture search (Liu et al., 2018, PNAS) with a tiny MLP-ensemble predictor.

Level 1 scores every 1-block cell (or a seeded sample), then a predictor is fit on
(cell encoding, accuracy). For b = 2..B the cells of the previous level are expanded by one
block, the predictor ranks the children, the top `beam` are scored and the predictor is
refit on everything measured so far. Every scored cell is appended at once to
``OUT/search.jsonl``; rerunning with the same OUT resumes and scores no cell twice.
Under torchrun the cells of each level are shared among the processes (`Team`, at the end).
"""
import itertools
import json
import os
import random
import threading
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from cells import canonical, cell_key, cell_to_json, encode, expand
from maml import Diverged


class LogError(ValueError):
    """search.jsonl cannot be read back; the message names the line and the fix."""


class SearchError(RuntimeError):
    """The search cannot go on (e.g. every candidate of a level failed)."""


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


# ---------------------------------------------------------------------------- the log

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
            raise LogError(f"line {n} of {path} is not valid JSON ({e.msg}): delete that line or start a new --out folder") from e
        records[cell_key(record["cell"])] = record
    return records


def append_log(path, record):
    """Append one record as a JSON line and make it durable before going on."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json(path, data):
    """Write JSON atomically: a temporary file, then a rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- the search

def first_level(ops, max_first, seed):
    """All 1-block cells, or a seeded sample of `max_first` of them."""
    cells = expand((), ops)
    if max_first and max_first < len(cells):
        cells = sorted(random.Random(seed).sample(cells, max_first))
    return cells


def score_safely(score, cell):
    """Run score(cell); a divergence or an exception inside it becomes a logged status."""
    start = time.time()
    try:
        result = dict(score(cell), status="ok")
    except Diverged as e:
        result = dict(accuracy=None, ci95=None, status="diverged", error=str(e))
    except Exception as e:  # one bad candidate (e.g. out of memory) must not end a long search
        first_line = (str(e).splitlines() or [""])[0]
        result = dict(accuracy=None, ci95=None, status="failed", error=f"{type(e).__name__}: {first_line}")
    result["seconds"] = round(time.time() - start, 3)
    return result


def score_here(score, cells):
    """Score the cells one after another in this process, yielding (cell, result) as each finishes."""
    for cell in cells:
        yield cell, score_safely(score, cell)


def search(score, out, blocks, beam, ops, max_first=0, seed=0, config=None, log=print, predictor=None,
           on_level=None, team=None):
    """Progressive search; `score(cell)` -> {'accuracy', 'ci95', 'params'}. Returns the best record.

    Writes OUT/search.jsonl (one line per scored cell) and OUT/best.json; `on_level(b, records)`
    is called after each level with the log records of every cell scored so far. With a `team`
    (see Team) this runs on rank 0 and every level is scored by all ranks together.
    """
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "search.jsonl")
    done = read_log(log_path)
    predictor = predictor or Predictor(blocks, ops, seed=seed)
    measured = {}  # cell key -> record, for every ok cell of this search
    total = (len(first_level(ops, max_first, seed)) + beam * (blocks - 1))
    count, timed = 0, []
    score_all, workers = (score_here, 1) if team is None else (team.score_all, team.size)

    level_cells, predicted = first_level(ops, max_first, seed), None
    for b in range(1, blocks + 1):
        if b > 1:
            parents = [c for c in level_cells if cell_key(c) in measured]
            children = sorted({canonical(child) for p in parents for child in expand(p, ops)})
            scores = predictor.predict(children)
            order = sorted(range(len(children)), key=lambda i: (-scores[i], cell_key(children[i])))[:beam]
            level_cells = [children[i] for i in order]
            predicted = {cell_key(children[i]): float(scores[i]) for i in order}
        level_start = time.time()
        logged = [(cell, None) for cell in level_cells if cell_key(cell) in done]
        missing = [cell for cell in level_cells if cell_key(cell) not in done]
        # the cells logged by an earlier run first, then each new result as soon as it arrives
        for i, (cell, result) in enumerate(itertools.chain(logged, score_all(score, missing)), 1):
            count += 1
            key, fresh = cell_key(cell), result is not None
            if fresh:
                record = dict(level=b, cell=cell_to_json(canonical(cell)), blocks=len(cell),
                              predicted=None if predicted is None else round(predicted[key], 4), **result)
                append_log(log_path, record)
                done[key] = record
                timed.append(record["seconds"])
            record = done[key]
            eta = np.mean(timed) * (total - count) / workers if timed else None  # unknown until a cell is timed
            log(progress_line(b, blocks, i, len(level_cells), record, eta, fresh))
        this_level = [done[cell_key(c)] for c in level_cells if done[cell_key(c)]["status"] == "ok"]
        # in level order, not the order results arrived in: the predictor's bootstrap depends on it
        measured.update((cell_key(r["cell"]), r) for r in this_level)
        if not this_level:
            raise SearchError(f"no candidate of level {b} trained successfully: see {log_path} for each error")
        if predicted is not None:
            rho = spearman([r["predicted"] for r in this_level], [r["accuracy"] for r in this_level])
            log(f"level {b}: Spearman rank correlation, predicted vs measured: "
                + ("n/a" if rho is None else f"{rho:+.3f}") + f" ({len(this_level)} cells)")
        log(f"level {b} done in {time.time() - level_start:.1f} s")
        if on_level is not None:
            on_level(b, list(done.values()))
        if b < blocks:
            records = list(measured.values())
            predictor.fit([tuple(map(tuple, r["cell"])) for r in records], [r["accuracy"] for r in records])

    best = max(measured.values(), key=lambda r: (r["accuracy"], -r["blocks"]))
    write_json(os.path.join(out, "best.json"),
               {"cell": best["cell"], "accuracy": best["accuracy"], "ci95": best["ci95"], "config": config or {}})
    if team is not None:
        team.dismiss()
    return best


def progress_line(level, blocks, i, n, record, eta, fresh=True):
    """One line per candidate: level, i/total, accuracy, seconds (or 'logged' when resumed), ETA of the search."""
    if record["status"] == "ok":
        result = f"acc {100 * record['accuracy']:5.2f}% ± {100 * record['ci95']:5.2f}%"
    else:
        result = f"{record['status']}: {record.get('error', '')}"
    seconds = f"{record['seconds']:6.1f} s" if fresh else "  logged"
    eta = "ETA     ? min" if eta is None else f"ETA {eta / 60:5.1f} min"
    return f"[level {level}/{blocks}] {i:>3}/{n}  {result}  {seconds}  {eta}  {json.dumps(record['cell'])}"


# ---------------------------------------------------------------------------- sharing a search among processes

class Team:
    """The processes of one torchrun job. Rank 0 runs `search(..., team=team)`, the others `team.serve(score)`.

    Everything goes through the job's TCPStore, one round of keys per level. Rank 0 posts the cells
    still to score; every rank (rank 0 in a helper thread) takes the next one from a counter, where
    `store.add` is atomic, so a rank that finishes early simply takes more and a level lasts about
    total work / ranks. Each result is pushed onto a queue in the store; rank 0 pops and logs it at
    once, so killing the job loses only the candidates being trained. Rank 0 alone reads and writes
    files, fits the predictor and chooses the next level. No wait lasts longer than `timeout`.
    """

    def __init__(self, store, rank, size, timeout):
        self.store, self.rank, self.size, self.timeout = store, rank, size, timeout
        self.levels = 0  # levels shared so far; every level has its own keys in the store
        self.stopping = threading.Event()  # set on rank 0 after an error: its helper thread takes no more cells

    @classmethod
    def join(cls, minutes):
        """Join the job torchrun started: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are in the environment."""
        timeout = timedelta(minutes=minutes)
        store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
        # gloo on GPUs too: the process group only marks the job (and serves a barrier), no tensor is sent
        dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=timeout)
        return cls(store, rank, size, timeout)

    def leave(self):
        dist.destroy_process_group()

    def score_all(self, score, cells):
        """On rank 0: score `cells` on all ranks, yielding (cell, result) in the order the results arrive."""
        keys = self._post(cells)
        # one store connection per thread, as Store.clone() is meant for. Not a daemon thread: Python
        # aborts when it exits while a daemon thread is inside torch, so after an error it lets the cell end.
        helper = threading.Thread(target=self._work, args=(self.store.clone(), score, cells, keys))
        helper.start()
        try:
            for waiting in range(len(cells), 0, -1):
                deadline = time.monotonic() + self.timeout.total_seconds()
                while self.store.queue_len(f"{keys}/results") == 0:  # polled, so that signals get through
                    if time.monotonic() > deadline:
                        raise SearchError(f"no result reached rank 0 for {self._minutes()} with {waiting} "
                                          "candidate(s) of this level unfinished, so a process has hung or died; "
                                          "every result so far is in search.jsonl: rerun the same command to resume "
                                          "(raise --wait-minutes if one candidate can take longer)")
                    time.sleep(0.05)
                i, result = json.loads(self.store.queue_pop(f"{keys}/results", False))
                yield cells[i], result
        except BaseException:  # an error here or in the caller (then GeneratorExit): take no more cells
            self.stopping.set()
            raise
        helper.join()

    def dismiss(self):
        """On rank 0: tell the other ranks the search is over."""
        self._post(None)

    def serve(self, score):
        """On the other ranks: score the cells rank 0 posts, level after level, until it dismisses us."""
        while True:
            keys = self._next_level()
            try:
                self.store.wait([f"{keys}/cells"], self.timeout)
            except dist.DistStoreError as e:
                raise SearchError(f"rank {self.rank} heard nothing from rank 0 for {self._minutes()}, so it has "
                                  "hung or died; rerun the same command to resume from search.jsonl") from e
            cells = json.loads(self.store.get(f"{keys}/cells"))
            if cells is None:
                return
            self._work(self.store, score, [tuple(map(tuple, cell)) for cell in cells], keys)

    def _post(self, cells):
        """Post the cells of the next level (None: the search is over); return the prefix of its keys."""
        keys = self._next_level()
        self.store.set(f"{keys}/cells", json.dumps(cells))
        return keys

    def _work(self, store, score, cells, keys):
        """Take cells by index from the shared counter until none is left; push each result with its index."""
        while not self.stopping.is_set() and (i := store.add(f"{keys}/taken", 1) - 1) < len(cells):
            store.queue_push(f"{keys}/results", json.dumps([i, score_safely(score, cells[i])]))

    def _next_level(self):
        self.levels += 1
        return f"autometa/level-{self.levels}"

    def _minutes(self):
        return f"{self.timeout.total_seconds() / 60:g} min"
