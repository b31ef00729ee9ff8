"""Sharing a search among the processes of a torchrun job: each level's candidates go to whichever
process is free, through the job's key-value store; rank 0 alone logs, fits the predictor and chooses."""
import json
import os
import signal
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import data
import pnas
from config import ConfigError, pick_device
from scoring import make_scorer


def launched_by_torchrun():
    """Whether this process is one of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_search(cfg, lead):
    """Every process of the job runs this: rank 0 calls lead(cfg, device, team), which searches with
    team.score_all; the other ranks score what it shares out until it dismisses them."""
    team = Team.join(cfg.wait_minutes)
    try:
        device = rank_device(pick_device(cfg.device))
        if team.rank == 0:  # torchrun sends SIGTERM to stop the job, e.g. when another process has failed
            signal.signal(signal.SIGTERM, lambda *_: stopped_by_torchrun(cfg.out))
            return lead(cfg, device, team)
        team.barrier()  # rank 0 decodes and caches the dataset first; this rank then reads the cache
        team.serve(make_scorer(cfg, data.splits_for(cfg, ("train", "val")), device))
    finally:
        team.leave()


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


def stopped_by_torchrun(out):
    """Say where the results are and exit now, without waiting for the candidate rank 0 is training."""
    print(f"autometa: stopped by torchrun (another process failed or the job was interrupted); every result so "
          f"far is in {out}/search.jsonl: rerun the same command to resume", file=sys.stderr, flush=True)
    os._exit(1)


class Team:
    """The processes of one torchrun job. Rank 0 searches with `score_cells=team.score_all`, the others
    run `team.serve(score)`.

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

    def barrier(self):
        """Wait until every rank gets here."""
        dist.barrier()

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
                        raise pnas.SearchError(f"no result reached rank 0 for {self._minutes()} with {waiting} "
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
                raise pnas.SearchError(f"rank {self.rank} heard nothing from rank 0 for {self._minutes()}, so it has "
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
            store.queue_push(f"{keys}/results", json.dumps([i, pnas.score_safely(score, cells[i])]))

    def _next_level(self):
        self.levels += 1
        return f"autometa/level-{self.levels}"

    def _minutes(self):
        return f"{self.timeout.total_seconds() / 60:g} min"
