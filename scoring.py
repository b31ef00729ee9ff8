"""The search's objective: meta-train a candidate cell from scratch with MAML, then score it by its
few-shot accuracy on fixed validation episodes."""
import hashlib

import torch

import cells
import data
import fastcpu
import maml
import pnas


def build_model(cfg, arch):
    """The network for a cell (or 'conv4') under this config."""
    return cells.build_network(arch, cfg.ways, cfg.image_size, cfg.channels, cfg.cells, cfg.reductions,
                               cfg.stem_stride)


def candidate_seed(seed, cell):
    """A seed from (global seed, canonical cell): a candidate's score never depends on search order."""
    digest = hashlib.sha256(f"{seed}:{pnas.cell_key(cell)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def make_scorer(cfg, splits, device):
    """score(cell) -> {"accuracy", "ci95", "params"}, or status "diverged" when training blew up.

    Every candidate is meta-trained from its own seed for cfg.meta_iters iterations on training
    episodes, then adapted and tested on the same cfg.eval_episodes validation episodes.
    """
    episodes = data.fixed_episodes(splits["val"], cfg.ways, cfg.shots, cfg.queries, cfg.eval_episodes,
                                   seed=cfg.seed, batch=cfg.meta_batch)

    def score(cell):
        cell = pnas.canonical(cell)  # the same network, weights and seed however the halves are written
        torch.manual_seed(candidate_seed(cfg.seed, cell))
        model = build_model(cfg, cell).to(device)
        sampler = data.EpisodeSampler(splits["train"], cfg.ways, cfg.shots, cfg.queries,
                                      candidate_seed(cfg.seed, cell))
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.meta_lr)
        try:
            with fastcpu.speedups(model, cfg.first_order) as layout:
                maml.meta_train(model, optimizer, lambda: layout(sampler.sample(cfg.meta_batch)), cfg.meta_iters,
                                cfg.inner_steps, cfg.inner_lr, cfg.first_order)
                accuracy, ci95 = maml.evaluate(model, dict(model.named_parameters()), map(layout, episodes),
                                               cfg.test_steps, cfg.inner_lr)
        except maml.Diverged as e:
            return dict(accuracy=None, ci95=None, status="diverged", error=str(e))
        return {"accuracy": round(accuracy, 5), "ci95": round(ci95, 5), "params": cells.count_parameters(model)}

    return score
