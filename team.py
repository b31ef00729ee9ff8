"""Sharing a search among processes: each level's candidates go to whichever process is free,
through a key-value store; rank 0 alone logs, fits the predictor and chooses. The processes are a
torchrun job's, or those `--workers N` starts on this machine."""
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import data
import pnas
import stops
from config import config_flags, pick_device
from scoring import candidates_dir, make_scorer

HERE = os.path.dirname(os.path.abspath(__file__))


def in_a_team():
    """Whether this process is one of several that torchrun, or a `--workers` search, started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_search(cfg, lead):
    """Every process of a torchrun job runs this: rank 0 calls lead(cfg, device, team), which searches with
    team.score_all; the other ranks score what it shares out until it dismisses them."""
    team = Team.join(cfg.wait_minutes)
    device = rank_device(pick_device(cfg.device), int(os.environ.get("LOCAL_RANK", "0")))
    if team.rank == 0:  # torchrun sends SIGTERM to stop the job, e.g. when another process has failed
        signal.signal(signal.SIGTERM, functools.partial(
            stops.raise_stopped, by="torchrun (SIGTERM: another process failed or the job was stopped)"))
        return lead(cfg, device, team)
    watch_parent(team.rank, cfg.out)
    try:
        team.barrier()  # rank 0 decodes and caches the dataset first; this rank then reads the cache
        team.serve(make_scorer(cfg, data.splits_for(cfg, ("train", "val")), device, keep=candidates_dir(cfg)))
    except dist.DistError as e:  # rank 0, which serves the store, is gone
        raise pnas.SearchError(rank0_gone(team.rank, cfg.out)) from e


def rank0_gone(rank, out):
    """A worker's one line when rank 0 ended without a word."""
    return (f"rank {rank} lost rank 0, which ended without a word: if the system killed it for lack of memory (the "
            "out-of-memory killer), use fewer --workers or a smaller preset; every result so far is in "
            f"{out}/search.jsonl: rerun the same command to resume")


def watch_parent(rank, out):
    """In a --workers worker: when rank 0, its parent, is gone (killed, so unable to stop it), say so and end
    at once rather than finish a candidate no one will log."""
    parent = os.environ.get("AUTOMETA_PARENT")
    if parent is None:  # under torchrun, which watches its processes itself
        return

    def watch():
        while os.getppid() == int(parent):
            time.sleep(0.2)
        print(f"autometa: search failed: {rank0_gone(rank, out)}", file=sys.stderr, flush=True)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def run_workers(cfg, count, lead):
    """--workers N without torchrun: this process becomes rank 0 of a team and calls lead(cfg, device, team);
    the team's first barrier starts the N - 1 other processes (see Workers)."""
    timeout = timedelta(minutes=cfg.wait_minutes)
    store = dist.TCPStore("127.0.0.1", 0, count, is_master=True, timeout=timeout, wait_for_workers=False)
    workers = Workers(cfg, count, store.port)
    try:
        return lead(cfg, rank_device(pick_device(cfg.device), 0), Team(store, 0, count, timeout, workers))
    except BaseException:  # a stop signal (stops.Stopped) or an error: they end with this process
        workers.stop(now=True)
        raise
    finally:
        workers.stop()  # dismissed by the lead: they are ending


class Workers:
    """The processes a `--workers N` search starts beside rank 0: the same search command, each with the
    environment torchrun would give it (RANK, WORLD_SIZE, the store's address), so that it serves as a rank."""

    def __init__(self, cfg, count, port):
        self.command = [sys.executable, os.path.join(HERE, "autometa.py"), "--search", *config_flags(cfg),
                        "--workers", "1"]
        self.env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(count),
                        LOCAL_WORLD_SIZE=str(count), AUTOMETA_PARENT=str(os.getpid()))
        # A worker whose rank 0 is gone says so in one line; torch's C++ warnings of the store's broken
        # connection (a frame dump) would come before it, so they are left out unless asked for.
        self.env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        self.count, self.out, self.processes = count, cfg.out, []

    def start(self):
        """Start them, once: at rank 0's first barrier, when it has checked the settings and cached the data.
        Each gets a session of its own, so that Ctrl-C reaches rank 0 alone, which then stops them."""
        if not self.processes:
            self.processes = [subprocess.Popen(self.command, env=dict(self.env, RANK=str(r), LOCAL_RANK=str(r)),
                                               start_new_session=True) for r in range(1, self.count)]

    def lost(self):
        """Why the search cannot go on when one of them has ended before rank 0 dismissed it; else None."""
        for rank, p in enumerate(self.processes, 1):
            if p.poll() is not None:
                return (f"worker process {rank} stopped with exit status {p.returncode} (its error is printed above); "
                        f"every result so far is in {self.out}/search.jsonl: rerun the same command to resume")
        return None

    def stop(self, now=False, seconds=60):
        """Wait for them to end (they do once dismissed), or with now=True end them at once."""
        for p in self.processes:
            if now:
                p.terminate()
        for p in self.processes:
            try:
                p.wait(seconds)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def rank_device(device, local_rank):
    """A team's process trains on `device`; plain 'cuda' means GPU local_rank, wrapping around the GPUs there
    are, so that several processes share each GPU."""
    if device.type != "cuda":
        return device
    if device.index is None:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


class Team:
    """The processes of one search. Rank 0 searches with `score_cells=team.score_all`, the others run
    `team.serve(score)`.

    Everything goes through the team's TCPStore, one round of keys per level. Rank 0 posts the cells
    still to score; every rank (rank 0 in a helper thread) takes the next one from a counter, where
    `store.add` is atomic, so a rank that finishes early simply takes more and a level lasts about
    total work / ranks. Each result is pushed onto a queue in the store; rank 0 pops and logs it at
    once, so killing the job loses only the candidates being trained. Rank 0 alone reads and writes
    files, fits the predictor and chooses the next level. No wait lasts longer than `timeout`; on rank 0
    of a --workers search, none outlasts one of its `workers` (torchrun watches its own processes).
    """

    def __init__(self, store, rank, size, timeout, workers=None):
        self.store, self.rank, self.size, self.timeout, self.workers = store, rank, size, timeout, workers
        self.started_by = "torchrun" if workers is None else "--workers"
        self.levels = self.barriers = 0  # rounds of keys used so far; each has its own keys in the store
        self.stopping = threading.Event()  # set on rank 0 after an error: its helper thread takes no more cells
        self.failure = None  # a SearchError met by rank 0's helper thread, raised by rank 0's main thread

    @classmethod
    def join(cls, minutes):
        """Join the job torchrun started: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are in the environment."""
        timeout = timedelta(minutes=minutes)
        store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
        return cls(store, rank, size, timeout)

    def barrier(self):
        """Wait until every rank gets here (a --workers search starts its other ranks at the first)."""
        if self.workers is not None:
            self.workers.start()
        self.barriers += 1
        key = f"autometa/barrier-{self.barriers}"
        self.store.add(key, 1)
        self._wait(lambda: self.store.add(key, 0) >= self.size, f"rank {self.rank} waited {self._minutes()} for the "
                   "others to start, so one has hung or died; rerun the same command to resume from search.jsonl")

    def score_all(self, score, cells, **options):
        """On rank 0: score `cells` on all ranks (score(cell, **options)), yielding (cell, result) in the
        order the results arrive."""
        keys = self._post(cells, options)
        # one store connection per thread, as Store.clone() is meant for. Not a daemon thread: Python
        # aborts when it exits while a daemon thread is inside torch, so after an error it lets the cell end.
        helper = threading.Thread(target=self._work_beside,
                                  args=(self.store.clone(), functools.partial(score, **options), cells, keys))
        helper.start()
        try:
            for waiting in range(len(cells), 0, -1):
                self._wait(lambda: self.store.queue_len(f"{keys}/results") > 0,
                           f"no result reached rank 0 for {self._minutes()} with {waiting} candidate(s) of this level "
                           "unfinished, so a process has hung or died; every result so far is in search.jsonl: "
                           "rerun the same command to resume (raise --wait-minutes if one candidate can take longer)")
                i, result = json.loads(self.store.queue_pop(f"{keys}/results", False))
                yield cells[i], result
        except BaseException:  # an error here or in the caller (then GeneratorExit): take no more cells
            self.stopping.set()
            raise
        helper.join()

    def wait_until_serving(self):
        """On rank 0: wait until every other rank is ready to score (--bench times a level from then on)."""
        self._wait(lambda: self.store.add("autometa/serving", 0) >= self.size - 1,
                   f"the other ranks were not ready to score after {self._minutes()}: one has hung or died")

    def dismiss(self):
        """On rank 0: tell the other ranks the search is over."""
        self._post(None)

    def serve(self, score):
        """On the other ranks: score the cells rank 0 posts, level after level, until it dismisses us."""
        self.store.add("autometa/serving", 1)
        while True:
            keys, started = self._next_level(), time.monotonic()
            try:
                self.store.wait([f"{keys}/cells"], self.timeout)
            except dist.DistError as e:  # no news in time (else rank 0, which serves a --workers store, is gone)
                if time.monotonic() - started < self.timeout.total_seconds():
                    raise
                raise pnas.SearchError(f"rank {self.rank} heard nothing from rank 0 for {self._minutes()}, so it has "
                                       "hung; rerun the same command to resume from search.jsonl") from e
            posted = json.loads(self.store.get(f"{keys}/cells"))
            if posted is None:
                return
            cells, options = [pnas.as_cell(cell) for cell in posted["cells"]], posted["options"]
            self._work(self.store, functools.partial(score, **options), cells, keys)

    def _wait(self, ready, message):
        """On rank 0 or at a barrier: poll until ready(), so that signals get through and a lost process is
        noticed; a SearchError with `message` once the timeout has passed."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        while not ready():
            if self.failure is not None:
                raise self.failure
            if self.workers is not None and (why := self.workers.lost()) is not None:
                raise pnas.SearchError(why)
            if time.monotonic() > deadline:
                raise pnas.SearchError(message)
            time.sleep(0.05)

    def _post(self, cells, options=None):
        """Post the next cells to score, with the options of score(cell, **options) (cells None: the search
        is over); return the prefix of its keys."""
        keys = self._next_level()
        self.store.set(f"{keys}/cells", json.dumps(None if cells is None else {"cells": cells, "options": options}))
        return keys

    def _work(self, store, score, cells, keys):
        """Take cells by index from the shared counter until none is left; push each result with its index."""
        while not self.stopping.is_set() and (i := store.add(f"{keys}/taken", 1) - 1) < len(cells):
            store.queue_push(f"{keys}/results", json.dumps([i, pnas.score_safely(score, cells[i])]))

    def _work_beside(self, store, score, cells, keys):
        """_work in rank 0's helper thread: a SearchError (the GPU is lost) goes to the main thread to raise."""
        try:
            self._work(store, score, cells, keys)
        except pnas.SearchError as e:
            self.failure = e

    def _next_level(self):
        self.levels += 1
        return f"autometa/level-{self.levels}"

    def _minutes(self):
        return f"{self.timeout.total_seconds() / 60:g} min"
