"""Tests: each part against an independent reference. Run: python -m pytest -q"""
import contextlib
import copy
import errno
import functools
import itertools
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.func import functional_call

import autometa
import cells
import config
import data
import fidelity
from data import DataError, EpisodeSampler, Split, check_split, describe, fixed_episodes, load_splits
import maml
import pnas
import drawing
import report
import scoring
import files
from files import write_json
import team
from team import Team

HERE = os.path.dirname(os.path.abspath(__file__))


def child_env(**settings):
    """The environment of every command the tests start, the same in any shell: one thread (CPU results
    depend on the thread count, and torchrun gives each process one) and no GPU. Commands run in HERE."""
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **settings)


@pytest.fixture(autouse=True)
def process_settings_restored():
    """Every test leaves torch's thread count as it found it (a command run here with autometa.main sets it for
    the whole process), so that no test's result depends on which tests ran before it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def one_thread():
    """Run torch here on one thread, as the commands the tests start do, for results compared with theirs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- maml.py

class TinyNet(nn.Module):
    """A smooth two-layer net, small enough for finite differences."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def tiny_tasks(tasks=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tasks, 6, 4, generator=g, dtype=torch.float64), torch.randint(3, (tasks, 6), generator=g),
            torch.randn(tasks, 9, 4, generator=g, dtype=torch.float64), torch.randint(3, (tasks, 9), generator=g))


def reference_meta_grad(w, tasks, steps, lr, first_order):
    """MAML written out by hand on a weight list [W1, b1, W2, b2], with no functional_call and no dicts."""
    def f(x, w):
        return torch.tanh(x @ w[0].T + w[1]) @ w[2].T + w[3]

    w = [t.detach().clone().requires_grad_() for t in w]
    xs, ys, xq, yq = tasks
    total = 0
    for t in range(xs.shape[0]):
        fast = w
        for _ in range(steps):
            g = torch.autograd.grad(F.cross_entropy(f(xs[t], fast), ys[t]), fast, create_graph=True)
            if first_order:
                g = [gi.detach() for gi in g]
            fast = [p - lr * gi for p, gi in zip(fast, g)]
        total = total + F.cross_entropy(f(xq[t], fast), yq[t])
    return torch.autograd.grad(total / xs.shape[0], w)


def ours_meta_grad(model, tasks, steps, lr, first_order):
    params = dict(model.named_parameters())
    loss, _ = maml.meta_loss(model, params, tasks, steps, lr, first_order)
    return torch.autograd.grad(loss, list(params.values()))


def test_second_order_meta_gradient_matches_hand_written_double_backward():
    torch.manual_seed(0)
    model, tasks = TinyNet().double(), tiny_tasks()
    w = [model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias]
    ours = ours_meta_grad(model, tasks, steps=2, lr=0.5, first_order=False)
    ref = reference_meta_grad(w, tasks, steps=2, lr=0.5, first_order=False)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-12)


def test_second_order_meta_gradient_matches_finite_differences():
    torch.manual_seed(1)
    model, tasks = TinyNet().double(), tiny_tasks(seed=1)
    ours = ours_meta_grad(model, tasks, steps=2, lr=0.5, first_order=False)
    params = dict(model.named_parameters())
    eps = 1e-6

    def loss_at(name, idx, delta):
        shifted = {k: v.detach().clone() for k, v in params.items()}
        shifted[name][idx] += delta
        return maml.meta_loss(model, {k: v.requires_grad_() for k, v in shifted.items()}, tasks, 2, 0.5)[0].item()

    for (name, p), g in zip(params.items(), ours):
        for idx in [(0,) * p.dim(), tuple(s - 1 for s in p.shape)]:
            numeric = (loss_at(name, idx, eps) - loss_at(name, idx, -eps)) / (2 * eps)
            assert abs(numeric - g[idx].item()) < 1e-6, (name, idx)


def test_first_order_equals_detached_reference_and_differs_from_second_order():
    torch.manual_seed(2)
    model, tasks = TinyNet().double(), tiny_tasks(seed=2)
    w = [model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias]
    first = ours_meta_grad(model, tasks, steps=2, lr=0.5, first_order=True)
    second = ours_meta_grad(model, tasks, steps=2, lr=0.5, first_order=False)
    ref = reference_meta_grad(w, tasks, steps=2, lr=0.5, first_order=True)
    for a, b in zip(first, ref):
        assert torch.allclose(a, b, atol=1e-12)
    assert max((a - b).abs().max().item() for a, b in zip(first, second)) > 1e-4


def test_adapt_with_zero_steps_returns_the_same_weights():
    model = TinyNet().double()
    params = dict(model.named_parameters())
    assert maml.adapt(model, params, None, None, 0, 0.1) is params


def test_evaluate_reports_the_mean_and_196_population_stds_over_root_n_of_the_episode_accuracies():
    # Reference: by hand, accuracies 0.2, 0.4, 0.4, 1.0 have mean 0.5 and population std
    # sqrt((0.09 + 0.01 + 0.01 + 0.25) / 4) = 0.3, so the interval is 1.96 * 0.3 / sqrt(4) = 0.294
    # (the sample std, sqrt(0.36 / 3), would give 0.3395).
    model, episodes, calls = TinyNet().double(), [tiny_tasks(4)], []
    params = dict(model.named_parameters())

    def per_episode(*args):
        calls.append(args)
        return [0.2, 0.4, 0.4, 1.0]

    mean, ci = maml.evaluate(model, params, episodes, 3, 0.25, per_episode=per_episode)
    assert mean == pytest.approx(0.5, abs=1e-12) and ci == pytest.approx(0.294, abs=1e-12)
    assert calls == [(model, params, episodes, 3, 0.25)]
    assert maml.evaluate(model, params, episodes, 3, 0.25, per_episode=lambda *a: [0.6]) == (0.6, 0.0)
    # by default, over maml.episode_accuracies, here from the statistics module
    accuracies = maml.episode_accuracies(model, params, episodes, 1, 0.1)
    assert len(accuracies) == 4 and len(set(accuracies)) > 1
    mean, ci = maml.evaluate(model, params, episodes, 1, 0.1)
    assert mean == pytest.approx(statistics.fmean(accuracies), abs=1e-12)
    assert ci == pytest.approx(1.96 * statistics.pstdev(accuracies) / 2, abs=1e-12)


def test_meta_step_raises_diverged_on_nan():
    model = TinyNet().double()
    xs, ys, xq, yq = tiny_tasks()
    with pytest.raises(maml.Diverged):
        maml.meta_step(model, torch.optim.SGD(model.parameters(), 0.1), (xs * float("nan"), ys, xq, yq), 1, 0.1)


def test_functional_call_on_a_dict_of_weights_gives_conv4_written_by_hand_with_those_weights():
    # Reference: MAML's conv4 with torch.nn.functional ops (4 x conv, BatchNorm on the batch, ReLU, 2x2 max-pool,
    # then linear) on the dict's weights, which are not the module's own.
    torch.manual_seed(0)
    model = cells.build_network(cells.CONV4_CELL, 5, 28, channels=4).double()
    params = {name: torch.randn_like(p) for name, p in model.named_parameters()}  # BatchNorm's affine too
    w = list(params.values())  # per layer: conv weight, BatchNorm weight and bias; then the linear's
    x = torch.rand(6, 3, 28, 28, dtype=torch.float64)
    h = x
    for k in range(4):
        h = F.conv2d(h, w[3 * k], padding=1)
        h = F.batch_norm(h, None, None, w[3 * k + 1], w[3 * k + 2], training=True)
        h = F.max_pool2d(F.relu(h), 2)
    logits = F.linear(h.flatten(1), w[12], w[13])
    assert [tuple(t.shape) for t in w[12:]] == [(5, 4), (5,)]  # 28 px pooled 4 times: 1x1 of 4 channels
    assert torch.allclose(functional_call(model, params, (x,)), logits, rtol=0, atol=1e-10)
    assert not torch.allclose(model(x), logits, atol=1e-3)  # the module's own weights give other logits


COPIED_ALONE = """
import torch, torch.nn as nn, maml, pnas
net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
batch = lambda: (torch.rand(2, 3, 3, 8, 8), torch.arange(3).expand(2, 3), torch.rand(2, 6, 3, 8, 8),
                 torch.arange(3).repeat(2).expand(2, 6))
maml.meta_train(net, torch.optim.Adam(net.parameters(), 1e-3), sample=batch, iterations=2, steps=1, lr=0.1)
print(maml.evaluate(net, dict(net.named_parameters()), [batch()], steps=1, lr=0.1))
ops = ["conv_3x3", "identity"]
log = pnas.SearchLog("search.jsonl")
pnas.search(lambda cell: {"accuracy": len(cell) / 3}, log, blocks=2, beam=3, ops=ops,
            first_cells=pnas.first_level(ops), predictor=pnas.Predictor(ops, epochs=5))
print(pnas.best(log.records.values())["blocks"])
"""


@pytest.mark.slow
def test_maml_and_pnas_work_when_copied_alone_into_another_project(tmp_path):
    for name in ("maml.py", "pnas.py"):
        (tmp_path / name).write_text(open(os.path.join(HERE, name)).read())
    run = subprocess.run([sys.executable, "-c", COPIED_ALONE], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "2"


# ---------------------------------------------------------------------------- cells.py

def relu_conv_bn(x, convs, bn_weight, bn_bias):
    """ReLU, the convolutions [(weight, keyword arguments)] in turn, BatchNorm on the batch's statistics."""
    x = F.relu(x)
    for weight, kw in convs:
        x = F.conv2d(x, weight, **kw)
    return F.batch_norm(x, None, None, bn_weight, bn_bias, training=True)


def avg_pool_3x3(x):
    """3x3 mean over the pixels of each window that lie inside the image, from sums of shifted copies."""
    side = x.shape[-1]
    padded = F.pad(x, (1, 1, 1, 1))
    inside = F.pad(torch.ones(1, 1, side, side), (1, 1, 1, 1))
    total = sum(padded[..., i:i + side, j:j + side] for i in range(3) for j in range(3))
    count = sum(inside[..., i:i + side, j:j + side] for i in range(3) for j in range(3))
    return total / count


def op_reference(op, w, C):
    """Each op written out with torch.nn.functional on its own weights w (in parameters() order)."""
    pad1, depthwise = dict(padding=1), dict(padding=1, groups=C)
    return {
        "conv_3x3": lambda x: relu_conv_bn(x, [(w[0], pad1)], w[1], w[2]),
        "conv_1x5_5x1": lambda x: relu_conv_bn(x, [(w[0], dict(padding=(0, 2))), (w[1], dict(padding=(2, 0)))], w[2], w[3]),
        "sep_conv_3x3": lambda x: relu_conv_bn(relu_conv_bn(x, [(w[0], depthwise), (w[1], {})], w[2], w[3]),
                                               [(w[4], depthwise), (w[5], {})], w[6], w[7]),
        "dil_conv_3x3": lambda x: relu_conv_bn(x, [(w[0], dict(padding=2, dilation=2, groups=C)), (w[1], {})], w[2], w[3]),
        "max_pool_3x3": lambda x: torch.stack([F.pad(x, (1, 1, 1, 1), value=-float("inf"))[..., i:i + x.shape[-2], j:j + x.shape[-1]]
                                               for i in range(3) for j in range(3)]).amax(0),
        "avg_pool_3x3": avg_pool_3x3,
        "identity": lambda x: x,
    }[op]


@pytest.mark.parametrize("op", [op for op in cells.OPS if op != "none"])
@pytest.mark.parametrize("size", [7, 28])
def test_every_op_computes_what_its_name_says(op, size):
    torch.manual_seed(0)
    module, x = cells.OPS[op](4).double(), torch.randn(2, 4, size, size, dtype=torch.float64)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()  # BatchNorm's affine too, so a missing one shows
        assert torch.allclose(module(x), op_reference(op, list(module.parameters()), 4)(x), atol=1e-10)


@pytest.mark.parametrize("op", list(cells.OPS))
@pytest.mark.parametrize("size", [16, 28])
def test_every_op_runs_inside_the_network(op, size):
    net = cells.Network(((0, op, 1, "conv_3x3"), (2, op, 0, "identity")), n_way=5, image_size=size, channels=4)
    assert net(torch.rand(3, 3, size, size)).shape == (3, 5)
    assert cells.count_parameters(net) == cells.parameter_count(net.cells[0].cell, 5, size, channels=4)


def maml_conv4(n_way, image_size, C=32):
    """MAML's conv4 as Finn et al. wrote it: 4 x (3x3 conv with bias, BatchNorm, ReLU, 2x2 max-pool), linear."""
    layers, c_in = [], 3
    for _ in range(4):
        layers += [nn.Conv2d(c_in, C, 3, padding=1), nn.BatchNorm2d(C, track_running_stats=False), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = C
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(C * (image_size // 16) ** 2, n_way))


@pytest.mark.parametrize("size, maml_params", [(28, 29061), (84, 32901)])
def test_the_conv4_cell_is_mamls_conv4_given_its_weights(size, maml_params):
    torch.manual_seed(0)
    ref, ours = maml_conv4(5, size), cells.build_network(cells.CONV4_CELL, 5, size)
    assert cells.count_parameters(ref) == maml_params  # 32,901 at 84 px, as MAML reports
    assert cells.count_parameters(ours) == maml_params - 4 * 32  # less the 4 conv biases BatchNorm cancels
    assert cells.parameter_count(cells.CONV4_CELL, 5, size) == maml_params - 4 * 32
    kinds = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
    theirs, mine = ([m for m in net.modules() if isinstance(m, kinds)] for net in (ref, ours))
    assert [type(m) for m in theirs] == [type(m) for m in mine]
    with torch.no_grad():
        for a, b in zip(theirs, mine):
            a.weight.normal_(0, 0.3), a.bias.normal_()  # every weight random, conv biases included
            b.weight.copy_(a.weight)
            if b.bias is not None:
                b.bias.copy_(a.bias)
    x = torch.rand(10, 3, size, size)
    assert torch.allclose(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_search_space_counts_and_canonical_dedup():
    ops = list(cells.OPS)
    level1 = pnas.expand((), ops)
    assert len(level1) == 105 + 14 == len({pnas.canonical(c) for c in level1})  # 2 inputs x 7 ops alone beside none
    assert all(pnas.canonical(c) == c for c in level1)
    assert len(pnas.expand(level1[0], ops)) == 21 * 22 // 2 + 21  # 3 inputs x 7 ops: unordered pairs, or one alone
    assert pnas.canonical(((1, "conv_3x3", 0, "none"),)) == pnas.canonical(((1, "none", 1, "conv_3x3"),))
    a, b = ((1, "conv_3x3", 0, "identity"),), ((0, "identity", 1, "conv_3x3"),)
    assert pnas.canonical(a) == pnas.canonical(b)
    assert torch.equal(pnas.encode(a, ops), pnas.encode(b, ops))
    assert pnas.encode(a, ops).shape == pnas.encode(cells.AUTOMETA_CELL, ops).shape == (4 + 8 + 8 * 9 // 2,)
    # one bag of ops in other pairs is another cell to the predictor
    x, y = (1, "conv_3x3", 1, "identity"), (1, "max_pool_3x3", 1, "sep_conv_3x3")
    z, w = (1, "conv_3x3", 1, "max_pool_3x3"), (1, "identity", 1, "sep_conv_3x3")
    assert torch.equal(pnas.encode((x, y), ops), pnas.encode((y, x), ops))
    assert not torch.equal(pnas.encode((x, y), ops), pnas.encode((z, w), ops))


def test_cell_json_round_trip_and_validation(tmp_path):
    path = tmp_path / "cell.json"
    path.write_text(json.dumps(cells.AUTOMETA_CELL))
    assert cells.load_arch(str(path)) == cells.AUTOMETA_CELL
    (tmp_path / "best.json").write_text(json.dumps({"cell": [[1, "conv_3x3", 0, "identity"]], "accuracy": 0.5}))
    assert cells.load_arch(str(tmp_path / "best.json")) == ((1, "conv_3x3", 0, "identity"),)
    for bad, words in [([[0, "conv_9x9", 1, "identity"]], "unknown op"), ([[3, "conv_3x3", 1, "identity"]], "input 3"),
                       ([[0, "conv_3x3"]], "block 0"), ([], "non-empty")]:
        with pytest.raises(cells.CellError, match=words):
            cells.parse_cell(bad)
    (tmp_path / "broken.json").write_text("[[0, ")
    with pytest.raises(cells.CellError, match="not valid JSON"):
        cells.load_arch(str(tmp_path / "broken.json"))


def test_unused_cell_inputs_get_no_parameters():
    net = cells.Network(cells.AUTOMETA_CELL, 5, 28, channels=4)  # never reads input 0
    assert all(c.pre0 is None for c in net.cells)
    assert all(p.grad is not None for p in (net(torch.rand(2, 3, 28, 28)).sum().backward(), *net.parameters())[1:])


# ---------------------------------------------------------------------------- pnas.py

def test_spearman_against_hand_computed_values():
    assert pnas.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pnas.spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # ties get their average rank: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4)
    assert pnas.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)
    assert pnas.spearman([1, 1, 1], [1, 2, 3]) is None


def fake_accuracy(cell):
    """A known, learnable score: convolutions help, pooling hurts, a bit more per block."""
    worth = {"conv_3x3": 0.08, "conv_1x5_5x1": 0.06, "sep_conv_3x3": 0.05, "dil_conv_3x3": 0.04,
             "identity": 0.0, "avg_pool_3x3": -0.02, "max_pool_3x3": -0.03, "none": -0.01}
    return 0.3 + sum(worth[b[1]] + worth[b[3]] for b in cell) / (1 + 0.5 * len(cell))


def test_predictor_ranks_unseen_cells():
    ops = list(cells.OPS)
    level1 = pnas.expand((), ops)
    level2 = [c for p in level1[::10] for c in pnas.expand(p, ops)][::7]
    seen, unseen = level1 + level2[::4], [c for i, c in enumerate(level2) if i % 4]
    predictor = pnas.Predictor(ops, seed=0).fit(seen, [fake_accuracy(c) for c in seen])
    rho = pnas.spearman(predictor.predict(unseen), [fake_accuracy(c) for c in unseen])
    assert rho > 0.8


# ---- the search space up to block order (issue #17), checked against a brute force that knows nothing of it

def brute_force_key(cell):
    """The smallest tuple over every way of writing the same network: each order of the blocks in which a
    block comes after the blocks it reads, each order of each block's two halves, and each input a "none"
    half (which reads nothing) could be written with."""
    best = None
    for order in itertools.permutations(range(len(cell))):
        new = {0: 0, 1: 1, **{old + 2: position + 2 for position, old in enumerate(order)}}
        if any(new[i] >= new[b + 2] for b in order for i, op in ((cell[b][0], cell[b][1]), (cell[b][2], cell[b][3]))
               if op != "none"):
            continue  # a block would read a later one
        ways = []  # per block in this order: every way to write it
        for position, b in enumerate(order):
            in1, op1, in2, op2 = cell[b]
            ins1, ins2 = ([new[i]] if op != "none" else range(position + 2) for i, op in ((in1, op1), (in2, op2)))
            ways.append([w for a in ins1 for c in ins2 for w in ((a, op1, c, op2), (c, op2, a, op1))])
        for written in itertools.product(*ways):
            best = written if best is None or written < best else best
    return best


def every_cell(ops, blocks):
    """Every cell of `blocks` blocks, each new block appended with every pair of (input, op) but two nones: equal
    networks included."""
    level = [()]
    for _ in range(blocks):
        level = [parent + (a + b,) for parent in level for a, b in itertools.combinations_with_replacement(
            [(i, op) for i in range(len(parent) + 2) for op in ops], 2) if not a[1] == b[1] == "none"]
    return level


def same_partition(cells):
    """canonical() and brute_force_key() split `cells` into the same networks; returns how many there are."""
    classes = {(brute_force_key(c), pnas.canonical(c)) for c in cells}
    assert len({k for k, _ in classes}) == len({f for _, f in classes}) == len(classes)
    assert all(brute_force_key(form) == key for key, form in classes)  # each form writes its own network
    return len(classes)


@pytest.mark.parametrize("blocks, networks", [(1, 119), (2, 22967)])
def test_canonical_merges_exactly_the_cells_that_are_one_network(blocks, networks):
    assert same_partition(every_cell(list(cells.OPS), blocks)) == networks
    assert len(pnas.expand((), list(cells.OPS))) == 119


def test_canonical_on_three_blocks_of_three_ops_and_copies_of_a_block():
    assert same_partition(every_cell(["conv_3x3", "identity", "max_pool_3x3"], 3)) == 37303
    copy, x, y = (1, "conv_3x3", 1, "conv_3x3"), "identity", "max_pool_3x3"
    reads_both, reads_one_twice = (copy, copy, (2, x, 3, y)), (copy, copy, (2, x, 2, y))
    assert pnas.canonical(reads_both) != pnas.canonical(reads_one_twice)  # two copies are two blocks
    assert pnas.canonical(reads_both) == pnas.canonical((copy, copy, (3, x, 2, y)))
    issue = [[[0, "conv_3x3", 1, "conv_1x5_5x1"], [1, "conv_3x3", 2, "conv_1x5_5x1"], [1, "conv_1x5_5x1", 1, "conv_1x5_5x1"]],
             [[0, "conv_3x3", 1, "conv_1x5_5x1"], [1, "conv_1x5_5x1", 1, "conv_1x5_5x1"], [1, "conv_3x3", 2, "conv_1x5_5x1"]]]
    assert pnas.canonical(pnas.as_cell(issue[0])) == pnas.canonical(pnas.as_cell(issue[1]))  # the issue's two cells, scored twice


def test_expand_gives_every_child_network_once():
    ops = list(cells.OPS)
    level1 = pnas.expand((), ops)
    assert len({c for p in level1 for c in pnas.expand(p, ops)}) == 22967
    children = pnas.expand(cells.AUTOMETA_CELL[:2], ops)
    assert children == sorted(set(children)) and all(pnas.canonical(c) == c for c in children)


def known_score(cell):
    """A plausible accuracy for any cell: the mean over its halves of a value of the op, plus the mean of a value
    of the kind of input over the halves that read one (a none half reads nothing)."""
    op_value = dict(zip(cells.OPS, [0.60, 0.57, 0.62, 0.58, 0.52, 0.50, 0.46, 0.48]))
    halves = [(i, op) for in1, op1, in2, op2 in cell for i, op in ((in1, op1), (in2, op2))]
    return float(np.mean([op_value[op] for _, op in halves])
                 + np.mean([(-0.01, 0.01, 0.02)[min(i, 2)] for i, op in halves if op != "none"]))


@pytest.mark.slow
def test_predictor_fit_on_one_block_cells_ranks_their_deeper_children():
    ops = list(cells.OPS)
    level1 = pnas.expand((), ops)
    top = lambda cs: sorted(cs, key=lambda c: (-known_score(c), c))[:5]  # noqa: E731
    level2 = sorted({c for p in top(level1) for c in pnas.expand(p, ops)})
    unseen = level2 + sorted({c for p in top(level2) for c in pnas.expand(p, ops)})
    truth = [known_score(c) for c in unseen]
    predicted = [pnas.Predictor(ops, seed=s).fit(level1, [known_score(c) for c in level1]).predict(unseen)
                 for s in (0, 1)]
    assert min(pnas.spearman(p, truth) for p in predicted) >= 0.9
    assert pnas.spearman(*predicted) >= 0.9  # two predictor seeds rank them alike


# a seeded value for each unordered pair of ops, "none" included: a score that no sum over ops can give
PAIR_VALUE = {pair: value for pair, value in zip(itertools.combinations_with_replacement(sorted(cells.OPS), 2),
                                                 np.random.default_rng(23).uniform(0.2, 0.8, 36))}


def pair_score(cell):
    """The mean over blocks of its op pair's value, plus 0.01 for each of its halves reading a block's output."""
    def block(in1, op1, in2, op2):
        reads_a_block = sum(i > 1 for i, op in ((in1, op1), (in2, op2)) if op != "none")
        return PAIR_VALUE[tuple(sorted((op1, op2)))] + 0.01 * reads_a_block
    return float(np.mean([block(*b) for b in cell]))


@pytest.mark.slow
def test_predictor_fit_on_one_block_cells_ranks_children_by_the_op_pairs_of_their_blocks():
    ops = list(cells.OPS)
    level1 = pnas.expand((), ops)
    parents = sorted(level1, key=lambda c: (-pair_score(c), c))[:5]
    unseen = sorted({c for p in parents for c in pnas.expand(p, ops)})
    truth = np.array([pair_score(c) for c in unseen])
    best = set(np.argsort(-truth, kind="stable")[:len(unseen) // 5])  # the top 20% of the children
    for seed in (0, 1):
        predicted = pnas.Predictor(ops, seed=seed).fit(level1, [pair_score(c) for c in level1]).predict(unseen)
        assert pnas.spearman(predicted, truth) >= 0.8
        assert set(np.argsort(-predicted, kind="stable")[:5]) <= best


# Level 1 of a logged default search (seed 6): conv4 scored best, alone of its kind among sums of
# separable, dilated and 1x5 convolutions.
LONE_BEST_LEVEL = [
    ([[1, "conv_3x3", 1, "none"]], 0.592),
    ([[0, "conv_1x5_5x1", 0, "sep_conv_3x3"]], 0.552),
    ([[0, "conv_1x5_5x1", 1, "sep_conv_3x3"]], 0.5456),
    ([[0, "conv_3x3", 0, "sep_conv_3x3"]], 0.5232),
    ([[0, "conv_3x3", 1, "sep_conv_3x3"]], 0.556),
    ([[0, "dil_conv_3x3", 0, "dil_conv_3x3"]], 0.5048),
    ([[0, "dil_conv_3x3", 0, "sep_conv_3x3"]], 0.5696),
    ([[0, "dil_conv_3x3", 1, "conv_1x5_5x1"]], 0.4672),
    ([[0, "dil_conv_3x3", 1, "conv_3x3"]], 0.5136),
    ([[0, "dil_conv_3x3", 1, "sep_conv_3x3"]], 0.5768),
    ([[0, "sep_conv_3x3", 1, "conv_1x5_5x1"]], 0.5376),
    ([[0, "sep_conv_3x3", 1, "sep_conv_3x3"]], 0.5744),
    ([[1, "conv_3x3", 1, "sep_conv_3x3"]], 0.5696),
]


def test_predictor_ranks_the_children_of_a_lone_best_cell_first():
    """The ensemble's members all see every score, so they reproduce them and a level's one best cell leads its
    children into the next beam (bootstrap resamples dropped it from a third of the members: its best child
    ranked 34th of 3,198 on this level)."""
    ops = list(cells.OPS)
    level = [(pnas.canonical(pnas.as_cell(c)), a) for c, a in LONE_BEST_LEVEL]
    seen = [c for c, _ in level]
    predictor = pnas.Predictor(ops, seed=6).fit(seen, [a for _, a in level])
    assert np.abs(predictor.predict(seen) - [a for _, a in level]).max() < 0.01
    children = sorted({child for parent in seen for child in pnas.expand(parent, ops)})
    predicted = predictor.predict(children)
    beam = [children[i] for i in np.argsort(-predicted, kind="stable")[:5]]
    assert beam[0] in pnas.expand(seen[0], ops)  # conv4's
    chain = pnas.canonical(pnas.as_cell([[1, "conv_3x3", 1, "none"], [2, "conv_3x3", 2, "none"]]))
    assert chain in beam


def quiet():
    """A search's progress, unprinted."""
    return pnas.Progress(0, 0, say=lambda line: None)


def run_fake_search(out, score=None, blocks=3, beam=3, max_first=10, predictor=None, job=None, **kw):
    """pnas.search with a fake score (fake_accuracy), as autometa.py runs it; `job`: a torchrun Team. Its
    default predictor is a small one (what it is worth is tested on its own): fitting the real one is most
    of a fake search's time."""
    os.makedirs(out, exist_ok=True)
    ops = list(cells.OPS)
    predictor = predictor or pnas.Predictor(ops, members=2, epochs=60, seed=0)
    first = pnas.first_level(ops, max_first, seed=0)
    log = pnas.SearchLog(os.path.join(out, "search.jsonl"))
    measured = pnas.search(score or (lambda c: {"accuracy": fake_accuracy(c), "ci95": 0.01, "params": 1}), log,
                           blocks, beam, ops, first, predictor,
                           score_cells=None if job is None else job.score_all, progress=quiet(), **kw)
    best = pnas.best(measured)
    write_json(os.path.join(out, "best.json"), {k: best[k] for k in ("cell", "accuracy", "ci95")})
    return best


def test_a_screen_scores_every_first_cell_cheaply_and_the_search_scores_only_the_best_of_them(tmp_path):
    calls = []

    def score(cell, trial=0, fresh=False, meta_iters=None):  # the screen sees the score through a little noise
        calls.append((cell, meta_iters))
        noise = 0.002 * (sum(map(ord, pnas.cell_key(cell))) % 7) if meta_iters else 0.0
        return {"accuracy": fake_accuracy(cell) + noise, "ci95": 0.01, "params": 1, "meta_iters": meta_iters or 60}

    first = pnas.first_level(cells.OPS)
    run_fake_search(tmp_path, score, blocks=2, beam=2, max_first=0, baseline=(cells.CONV4_CELL,),
                    screen=(5, {"meta_iters": 20}), predictor=pnas.Predictor(cells.OPS, members=1, epochs=20))
    rows = read_lines(tmp_path / "search.jsonl")
    screened = {pnas.cell_key(pnas.as_cell(r["cell"])): r["accuracy"] for r in rows if r["role"] == "screen"}
    assert len(screened) == len(first) - 1 and all(r["meta_iters"] == 20 for r in rows if r["role"] == "screen")
    best5 = sorted(screened, key=lambda k: -screened[k])[:5]  # by hand: the five best screen scores
    assert sorted(pnas.cell_key(pnas.as_cell(r["cell"])) for r in rows if r["role"] == "first") == sorted(best5)
    assert [r["role"] for r in rows if r["level"] == 1 and r["role"] not in ("screen",)] == ["baseline"] + ["first"] * 5
    assert all(r["meta_iters"] == 60 for r in rows if r["role"] != "screen")
    assert calls.count((cells.CONV4_CELL, 20)) == 0  # the baseline is not screened: it is always scored
    calls.clear()
    run_fake_search(tmp_path, score, blocks=2, beam=2, max_first=0, baseline=(cells.CONV4_CELL,),
                    screen=(5, {"meta_iters": 20}), predictor=pnas.Predictor(cells.OPS, members=1, epochs=20))
    assert calls == [] and read_lines(tmp_path / "search.jsonl") == rows  # resumed: nothing scored again
    report.write_report(str(tmp_path), list(pnas.SearchLog(str(tmp_path / "search.jsonl")).records.values()),
                        REPORT_CONFIG)
    md = (tmp_path / "report.md").read_text()
    cut = min(screened[k] for k in best5)
    assert (f"All {len(screened)} one-block cells were first scored at 20 meta-iterations (0 failed); the best 5 "
            f"trained on from there to the full objective (screen scores from {100 * max(screened.values()):.2f}% down "
            f"to {100 * cut:.2f}%).") in md


@pytest.mark.slow
def test_a_screened_search_trains_its_kept_cells_on_and_ends_as_one_that_trained_them_from_scratch(tmp_path, capsys):
    args = ["--search", "--ops", "conv_3x3,identity", "--screen-iters", "1", *TINY, "--rescore-iters", "4"]  # keeps 3
    out = tmp_path / "whole"
    with one_thread():
        assert autometa.main([*args, "--out", str(out)]) == 0
    assert not (out / "candidates").exists()  # the screened cells' training, removed once level 1 is done
    rows = read_lines(out / "search.jsonl")
    roles = [r["role"] for r in rows]
    assert roles.count("first") == 3 and roles.count("screen") > 3
    assert {r["meta_iters"] for r in rows if r["role"] == "screen"} == {1}
    assert {r["meta_iters"] for r in rows if r["role"] == "rescore"} == {4}  # the final choice trains longer
    assert {r["meta_iters"] for r in rows if r["role"] not in ("screen", "rescore")} == {3}
    # the same search from its screen alone: the kept cells train from scratch, with the same scores
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(out / "config.json", again / "config.json")
    (again / "search.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["role"] == "screen"))
    with one_thread():
        assert autometa.main([*args, "--out", str(again)]) == 0
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert timeless(read_lines(again / "search.jsonl")) == timeless(rows)
    assert "screen 1/" in capsys.readouterr().out


def test_rescores_go_to_score_cells_a_trial_at_a_time_with_their_options_and_resume(tmp_path):
    calls = []

    def score_cells(score, cells, **options):  # as a team's score_all: the cells of one round, with options
        calls.append((len(cells), options))
        return pnas.score_each(score, cells, **options)

    def score(cell, trial=0, fresh=False, meta_iters=None):
        return {"accuracy": fake_accuracy(cell) + 0.01 * trial + 0.1 * fresh, "ci95": 0.01, "params": 1,
                "meta_iters": meta_iters or 60}

    log = pnas.SearchLog(str(tmp_path / "search.jsonl"))
    measured = pnas.score_level(log, 1, [(c, "first") for c in pnas.first_level(cells.OPS, 3)], score, score_cells, quiet())
    best = pnas.debiased_best(log, score, measured, 3, 2, score_cells, quiet(), meta_iters=300)  # a longer training
    assert calls[1:] == [(3, {"trial": t, "fresh": True, "meta_iters": 300}) for t in (1, 2)]
    assert [r["meta_iters"] for r in read_lines(tmp_path / "search.jsonl")] == [60] * 3 + [300] * 6
    assert best["rescore"]["accuracy"] == pytest.approx(fake_accuracy(pnas.as_cell(best["cell"])) + 0.115)
    again = pnas.SearchLog(str(tmp_path / "search.jsonl"))
    calls.clear()
    again_best = pnas.debiased_best(again, score, measured, 3, 2, score_cells, quiet(), meta_iters=300)
    assert again_best["rescore"] == best["rescore"]
    assert calls == []


def read_lines(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_search_logs_every_candidate_finds_a_good_cell_and_resumes_without_rescoring(tmp_path):
    best = run_fake_search(tmp_path)
    log = read_lines(tmp_path / "search.jsonl")
    assert len(log) == 10 + 3 + 3 and [r["level"] for r in log] == [1] * 10 + [2] * 3 + [3] * 3
    assert {"cell", "blocks", "accuracy", "ci95", "params", "seconds", "predicted", "status"} <= set(log[0])
    assert best["accuracy"] == max(r["accuracy"] for r in log)
    assert max(r["accuracy"] for r in log if r["level"] == 3) > max(r["accuracy"] for r in log if r["level"] == 1)
    assert cells.parse_cell(best["cell"])

    def must_not_score(cell):
        raise AssertionError("a logged cell was scored again")
    assert run_fake_search(tmp_path, score=must_not_score) == best
    assert len(read_lines(tmp_path / "search.jsonl")) == 16


@pytest.mark.slow
def test_search_drops_a_partial_last_line_and_finishes_the_same(tmp_path):
    full = run_fake_search(tmp_path / "a")
    lines = (tmp_path / "a" / "search.jsonl").read_text().splitlines(keepends=True)
    os.makedirs(tmp_path / "b")
    (tmp_path / "b" / "search.jsonl").write_text("".join(lines[:7]) + lines[7][:25])
    assert run_fake_search(tmp_path / "b") == full
    again = read_lines(tmp_path / "b" / "search.jsonl")
    assert len(again) == 16 and len({json.dumps(r["cell"]) for r in again}) == 16


@pytest.mark.slow
def test_diverged_and_failed_candidates_are_logged_and_the_search_goes_on(tmp_path):
    def score(cell):
        if cell[-1][1] == "max_pool_3x3":  # scoring.make_scorer reports a maml.Diverged so
            return {"accuracy": None, "ci95": None, "status": "diverged", "error": "meta-loss became nan"}
        if cell[-1][1] == "avg_pool_3x3":
            raise MemoryError("CUDA out of memory. Tried to allocate\nmore lines")
        return {"accuracy": fake_accuracy(cell), "ci95": 0.0, "params": 1}
    run_fake_search(tmp_path, score=score, max_first=0, blocks=2)
    status = {r["status"] for r in read_lines(tmp_path / "search.jsonl")}
    assert status == {"ok", "diverged", "failed"}
    failed = [r for r in read_lines(tmp_path / "search.jsonl") if r["status"] == "failed"]
    assert failed[0]["error"] == "MemoryError: CUDA out of memory. Tried to allocate"


@pytest.mark.slow
def test_probes_and_the_random_sampler_score_what_they_say(tmp_path):
    run_fake_search(tmp_path / "p", probes=2, blocks=3)
    log = read_lines(tmp_path / "p" / "search.jsonl")
    assert [r["role"] for r in log] == ["first"] * 10 + (["beam"] * 3 + ["probe"] * 2) * 2
    for b in (2, 3):  # the beam is the predictor's top of the level; the probes are not in it
        level = [r for r in log if r["level"] == b]
        assert min(r["predicted"] for r in level if r["role"] == "beam") >= max(
            r["predicted"] for r in level if r["role"] == "probe")
    run_fake_search(tmp_path / "r", sampler="random", blocks=3)
    randomly = read_lines(tmp_path / "r" / "search.jsonl")
    assert randomly[:10] == log[:10] or [r["cell"] for r in randomly[:10]] == [r["cell"] for r in log[:10]]
    assert len(randomly) == 16 and all(r["predicted"] is not None for r in randomly[10:])
    assert [r["cell"] for r in randomly[10:13]] != [r["cell"] for r in log[10:13]]


class WatchedPredictor(pnas.Predictor):
    """A predictor that remembers every cell it was asked to rank."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.ranked = []

    def predict(self, cells_):
        self.ranked.extend(cells_)
        return super().predict(cells_)


class FitWatcher(pnas.Predictor):
    """A predictor that remembers the scores it was fitted to."""

    def fit(self, cells_, accuracies):
        self.fitted = dict(zip(cells_, accuracies))
        return super().fit(cells_, accuracies)


def test_level_ones_best_cells_are_settled_by_the_mean_of_their_seeds_before_the_predictor_learns(tmp_path):
    first = pnas.first_level(cells.OPS, 6, seed=0)
    lucky, steady = first[0], first[1]  # trial 0 puts lucky first; its other seeds put it last

    def score(cell, trial=0, fresh=False):
        base = {lucky: 0.9 if trial == 0 else 0.1, steady: 0.8}.get(cell, 0.5 + 0.01 * first.index(cell)
                                                                   if cell in first else 0.5)
        return {"accuracy": base, "ci95": 0.01, "params": 1, "seed": trial}

    watcher = FitWatcher(cells.OPS, members=1, epochs=5)
    measured = run_fake_search(tmp_path, score, blocks=2, beam=2, max_first=6, predictor=watcher, noise=(2, 3))
    rows = read_lines(tmp_path / "search.jsonl")
    noise = [r for r in rows if r["role"] == "noise"]
    assert sorted((pnas.as_cell(r["cell"]), r["trial"]) for r in noise) == sorted(
        (c, t) for c in (lucky, steady) for t in (1, 2))  # the best 2 by trial 0, 2 more seeds each
    assert [r["role"] for r in rows[6:10]] == ["noise"] * 4  # right after level 1, before level 2
    assert watcher.fitted[lucky] == pytest.approx((0.9 + 0.1 + 0.1) / 3, abs=1e-5) and watcher.fitted[steady] == 0.8
    assert watcher.fitted[first[2]] == 0.52  # a cell outside the best 2 keeps its one score
    assert next(r for r in rows if pnas.as_cell(r["cell"]) == lucky)["accuracy"] == 0.9  # the log keeps each score
    assert measured is not None


def test_conv4_is_scored_at_level_1_of_every_search_once_and_is_a_parent_like_any_other(tmp_path):
    conv4 = cells.CONV4_CELL
    for max_first in (5, 0):  # a sample without conv4, and every cell (conv4 among them)
        out = tmp_path / str(max_first)
        run_fake_search(out, blocks=2, max_first=max_first, baseline=(conv4,), predictor=cheap_predictor())
        level1 = [r for r in read_lines(out / "search.jsonl") if r["level"] == 1]
        assert [pnas.as_cell(r["cell"]) for r in level1 if r["role"] == "baseline"] == [conv4]
        assert [pnas.as_cell(r["cell"]) for r in level1].count(conv4) == 1
        assert len(level1) == (5 + 1 if max_first else 119)
    watched = WatchedPredictor(cells.OPS, members=1, epochs=20)  # the children ranked at level 2 include conv4's
    run_fake_search(tmp_path / "c", blocks=2, max_first=5, baseline=(conv4,), predictor=watched)
    assert set(pnas.expand(conv4, cells.OPS)) <= set(watched.ranked)


def test_conv4_is_re_scored_beside_the_top_cells_and_wins_when_its_re_score_is_best(tmp_path):
    conv4, first = cells.CONV4_CELL, pnas.first_level(cells.OPS, 4, seed=1)

    def score(cell, trial=0, fresh=False):  # conv4 is last in the search, first when re-scored
        low = 0.2 if cell == conv4 else fake_accuracy(cell)
        return {"accuracy": 0.95 if fresh and cell == conv4 else low, "ci95": 0.01, "params": 1}
    log = pnas.SearchLog(str(tmp_path / "search.jsonl"))
    measured = pnas.score_level(log, 1, [(conv4, "baseline")] + [(c, "first") for c in first], score, progress=quiet())
    best = pnas.debiased_best(log, score, measured, 2, 1, progress=quiet())
    rescored = [r for r in read_lines(tmp_path / "search.jsonl") if r["role"] == "rescore"]
    assert len(rescored) == 3 and conv4 in [pnas.as_cell(r["cell"]) for r in rescored]
    assert best["cell"] == conv4 and best["rescore"]["accuracy"] == 0.95
    assert report.against_baseline(best, list(log.records.values())) == (
        "conv4 in this space: 20.00% ± 1.00% in the search, re-scored 95.00% (1 parameters). The best cell is conv4 "
        "itself: no searched cell beat it.")


def record(cell, accuracy, role="first", **kw):
    """A search log record, as pnas.score_level writes one."""
    return dict(level=len(cell), cell=cell, blocks=len(cell), role=role, status="ok", accuracy=accuracy, ci95=0.01,
                params=1, seed=0, predicted=None, **kw)


def test_one_rule_names_the_best_cell_and_says_whether_it_beat_conv4():
    conv4, a, b = cells.CONV4_CELL, ((1, "identity", 1, "none"),), ((1, "max_pool_3x3", 1, "none"),)
    searched = [record(conv4, 0.70, "baseline"), record(a, 0.90), record(b, 0.80)]
    assert pnas.best(searched)["cell"] == a and pnas.best(searched)["rescore"]["accuracy"] == 0.90
    assert report.against_baseline(pnas.best(searched), searched).endswith(
        "The best cell, in the search, beat it by 20.00 points.")
    again = [record(a, 0.60, "rescore", trial=1), record(b, 0.75, "rescore", trial=1),
             record(conv4, 0.72, "rescore", trial=1)]
    best = pnas.best(searched + again)  # the re-score decides, not the search's own score
    assert best["cell"] == b and best["rescore"] == {"accuracy": 0.75, "ci95": 0.01, "seeds": [0], "scores": {1: 0.75}}
    assert report.against_baseline(best, searched + again) == (
        "conv4 in this space: 70.00% ± 1.00% in the search, re-scored 72.00% (1 parameters). The best cell, "
        "re-scored on the same episodes, beat it by 3.00 points, on one re-score, which cannot separate it from conv4.")
    # three re-scores each: the gap of each trial, its mean and standard error, by hand
    trials = [record(c, x, "rescore", trial=t) for t, row in enumerate([(0.80, 0.70), (0.84, 0.80), (0.79, 0.71)], 1)
              for c, x in zip((b, conv4), row)]
    # gaps 10, 4, 8 points: mean 7.33, standard deviation 3.06, standard error 1.76: 7.33 > 2 x 1.76
    assert report.against_baseline(pnas.best(searched + trials), searched + trials).endswith(
        "beat it by 7.33 points (gap +7.33 ± 1.76 over 3 re-scores: separated from conv4).")
    trials[3]["accuracy"] = 0.90  # trial 2: conv4 6 points above, gaps 10, -6, 8: mean 4.00, error 5.03
    assert report.against_baseline(pnas.best(searched + trials), searched + trials).endswith(
        "beat it by 4.00 points; over 3 re-scores the gap is +4.00 ± 5.03 points (± one standard error), which does "
        "not separate it from conv4.")
    # every re-score of a cell failed: its own search score stands for it, among the re-scored cells only
    failed = [dict(again[0], status="failed", accuracy=None), again[1], again[2]]
    best = pnas.best(searched + failed)
    assert best["cell"] == a and best["rescore"]["accuracy"] == 0.90 and best["rescore"]["failed"]
    assert report.against_baseline(best, searched[1:]).startswith("conv4 in this space: not scored")
    assert report.against_baseline(best, searched + failed).endswith(  # said so, against conv4's re-score (72%)
        "Every re-score of the best cell failed, so its search score, biased upward, stands for it: it beat it by "
        "18.00 points.")
    assert not pnas.best(searched + again)["rescore"].get("failed")
    tie = [record(conv4, 0.70, "baseline"), record(a + ((2, "identity", 2, "none"),), 0.70)]
    assert pnas.best(tie)["cell"] == conv4  # on a tie the fewer blocks
    assert pnas.best([dict(r, status="failed") for r in tie]) is None


@pytest.mark.slow
def test_a_parameter_budget_keeps_every_child_over_it_from_being_ranked_or_scored(tmp_path):
    budget, count = 640, functools.partial(cells.parameter_count, n_way=5, image_size=28, channels=4)
    watched = WatchedPredictor(cells.OPS, members=1, epochs=20)
    run_fake_search(tmp_path / "a", blocks=3, max_first=0, baseline=(cells.CONV4_CELL,), probes=2,
                    predictor=watched, allowed=lambda c: count(c) <= budget)
    ranked = watched.ranked
    log = read_lines(tmp_path / "a" / "search.jsonl")
    assert ranked and max(count(c) for c in ranked) <= budget
    assert all(count(pnas.as_cell(r["cell"])) <= budget for r in log if r["role"] != "baseline")
    assert len([r for r in log if r["level"] == 1]) < 119 and [r["level"] for r in log].count(3) == 5
    over = [c for p in pnas.first_level(cells.OPS) for c in pnas.expand(p, cells.OPS) if count(c) > budget]
    assert over and not set(over) & {pnas.as_cell(r["cell"]) for r in log}
    said = []
    log = pnas.SearchLog(str(tmp_path / "b.jsonl"))
    pnas.search(lambda c: {"accuracy": 0.5}, log, 2, 2, list(cells.OPS), [], pnas.Predictor(cells.OPS),
                baseline=(cells.CONV4_CELL,), allowed=lambda c: len(c) < 2, progress=pnas.Progress(2, 2, say=said.append))
    assert "no child of level 1's cells is allowed (the parameter budget), so the search ends at level 1" in said[-1]


def test_parameter_count_equals_the_built_networks_for_random_cells():
    rng = random.Random(3)
    for k in range(40):
        cell = cells.parse_cell(random_cell(rng, 1 + k % 4))
        settings = dict(n_way=3 + k % 3, image_size=(16, 28, 84)[k % 3], channels=(4, 6, 8)[k % 3],
                        cells=1 + k % 2, reductions=(1, 2)[k % 2])
        assert cells.parameter_count(cell, **settings) == cells.count_parameters(cells.build_network(cell, **settings))


def test_failed_candidates_are_tried_again_and_superseded(tmp_path):
    broken = {"yes": True}

    def score(cell):
        if broken["yes"] and cell[-1][1] == "avg_pool_3x3":
            raise MemoryError("out of memory")
        return {"accuracy": fake_accuracy(cell), "ci95": 0.0, "params": 1}
    run_fake_search(tmp_path, score=score, blocks=1, max_first=0)
    failed = [r for r in read_lines(tmp_path / "search.jsonl") if r["status"] == "failed"]
    broken["yes"] = False  # the cause is fixed: a rerun scores those cells again
    run_fake_search(tmp_path, score=score, blocks=1, max_first=0)
    records = pnas.read_log(str(tmp_path / "search.jsonl"))
    assert len(records) == 119 and all(r["status"] == "ok" for r in records.values())
    assert len(read_lines(tmp_path / "search.jsonl")) == 119 + len(failed) and failed


def test_an_old_log_with_one_network_twice_keeps_its_first_row(tmp_path):
    a = [[0, "conv_3x3", 1, "identity"], [1, "identity", 1, "identity"]]
    b = a[::-1]  # block order swapped: one network (block 0 reads no block)
    rows = [dict(level=2, cell=a, blocks=2, accuracy=0.5, ci95=0.1, status="ok"),
            dict(level=2, cell=b, blocks=2, accuracy=0.6, ci95=0.1, status="ok")]
    (tmp_path / "search.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = pnas.read_log(str(tmp_path / "search.jsonl"))  # each cell read back as its one spelling
    assert list(records.values()) == [dict(rows[0], cell=pnas.canonical(pnas.as_cell(b)), role="beam")]


# ---------------------------------------------------------------------------- data.py

# class -> image count per split, named like the real Mini-ImageNet split csvs
CSV_CLASSES = {'train': {'n01532829': 4, 'n01558993': 5, 'n01704323': 4},
               'val': {'n01855672': 3, 'n02091244': 3},
               'test': {'n01930112': 3, 'n01981276': 4}}


def random_image(rng, size=20, mode='RGB'):
    """A PIL image of uniform noise, so that every fixture image is unique."""
    shape = (size, size, 3) if mode == 'RGB' else (size, size)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def make_csv_folder(root, rng):
    """A tiny Ravi & Larochelle layout: images/*.jpg plus {train,val,test}.csv."""
    (root / 'images').mkdir(parents=True)
    for split, classes in CSV_CLASSES.items():
        rows = ['filename,label']
        for cls, count in classes.items():
            for i in range(count):
                name = f'{cls}{i + 5:08d}.jpg'
                random_image(rng).save(root / 'images' / name)
                rows.append(f'{name},{cls}')
        (root / f'{split}.csv').write_text('\n'.join(rows) + '\n')
    return root


def make_pickle_folder(root, rng, size=10):
    """mini-imagenet-cache-{train,validation,test}.pkl with rows of classes interleaved."""
    root.mkdir(parents=True)
    originals = {}
    for split, n_classes in [('train', 3), ('validation', 2), ('test', 2)]:
        images = rng.integers(0, 256, (n_classes * 4, size, size, 3), dtype=np.uint8)
        class_dict = {f'{split}-c{c}': list(range(c, n_classes * 4, n_classes)) for c in range(n_classes)}
        with open(root / f'mini-imagenet-cache-{split}.pkl', 'wb') as f:
            pickle.dump({'image_data': images, 'class_dict': class_dict}, f)
        originals[split] = (images, class_dict)
    return originals


def make_class_folders(root, rng):
    """train/, validation/, test/ folders of grayscale PNG class folders (Omniglot-style)."""
    for split, n_classes in [('train', 3), ('validation', 2), ('test', 2)]:
        for c in range(n_classes):
            folder = root / split / f'{split}_char{c:02d}'
            folder.mkdir(parents=True)
            for i in range(3):
                random_image(rng, 12, 'L').save(folder / f'{i:04d}.png')


@pytest.fixture(scope='module')
def synthetic():
    return load_splits('synthetic', seed=0)


@pytest.fixture
def csv_root(tmp_path):
    return make_csv_folder(tmp_path / 'mini', np.random.default_rng(0))


def unique_split(n_classes=6, per_class=8, size=4):
    """A Split whose image i is filled with the value i, so pixels identify the index."""
    n = n_classes * per_class
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 3)).copy()
    labels = np.repeat(np.arange(n_classes), per_class)
    return Split('train', [f'c{c}' for c in range(n_classes)], images, labels)


# ---------------------------------------------------------------------------- layouts

def test_csv_layout(csv_root, tmp_path):
    splits = load_splits(str(csv_root), image_size=16, cache_dir=str(tmp_path / 'cache'))
    assert describe(splits) == ['train: 3 classes, 13 images, 16x16', 'val: 2 classes, 6 images, 16x16',
                                'test: 2 classes, 7 images, 16x16']
    for name, classes in CSV_CLASSES.items():
        split = splits[name]
        assert split.name == name and split.classes == sorted(classes)
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int64
        assert np.bincount(split.labels).tolist() == [classes[c] for c in split.classes]
    # image i is row i of the csv, converted and resized like an independent PIL call would
    first = csv_root / 'images' / 'n0155899300000005.jpg'
    expected = np.asarray(Image.open(first).convert('RGB').resize((16, 16), Image.Resampling.LANCZOS))
    assert np.array_equal(splits['train'].images[4], expected)
    assert splits['train'].classes[splits['train'].labels[4]] == 'n01558993'


def test_csv_default_image_size_is_84(csv_root, tmp_path):
    splits = load_splits(str(csv_root), cache_dir=str(tmp_path / 'cache'))
    assert splits['test'].images.shape == (7, 84, 84, 3)
    assert data.default_image_size(str(csv_root)) == 84 and data.default_image_size('synthetic') == 28


def test_pickle_layout_with_validation_name(tmp_path):
    originals = make_pickle_folder(tmp_path / 'pkl', np.random.default_rng(1))
    splits = load_splits(str(tmp_path / 'pkl'), image_size=10, cache_dir=str(tmp_path / 'cache'))
    assert describe(splits) == ['train: 3 classes, 12 images, 10x10', 'val: 2 classes, 8 images, 10x10',
                                'test: 2 classes, 8 images, 10x10']
    images, class_dict = originals['validation']
    split = splits['val']
    for label, cls in enumerate(split.classes):
        assert np.array_equal(split.images[split.labels == label], images[class_dict[cls]])
    resized = load_splits(str(tmp_path / 'pkl'), image_size=6, cache_dir=str(tmp_path / 'cache'))
    assert resized['train'].images.shape == (12, 6, 6, 3)


def test_class_folder_layout(tmp_path):
    make_class_folders(tmp_path / 'omni', np.random.default_rng(2))
    splits = load_splits(str(tmp_path / 'omni'), image_size=8, cache_dir=str(tmp_path / 'cache'))
    assert describe(splits) == ['train: 3 classes, 9 images, 8x8', 'val: 2 classes, 6 images, 8x8',
                                'test: 2 classes, 6 images, 8x8']
    assert splits['val'].classes == ['validation_char00', 'validation_char01']
    assert splits['train'].labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    gray = splits['train'].images
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])


def test_synthetic(synthetic):
    assert describe(synthetic) == ['train: 64 classes, 1280 images, 28x28',
                                   'val: 16 classes, 320 images, 28x28',
                                   'test: 20 classes, 400 images, 28x28']
    names = [set(synthetic[s].classes) for s in data.SPLITS]
    assert sum(map(len, names)) == len(set.union(*names)) == 100  # disjoint across splits
    again = load_splits('synthetic', seed=0)
    other = load_splits('synthetic', seed=1)
    for s in data.SPLITS:
        assert synthetic[s].images.dtype == np.uint8 and synthetic[s].labels.dtype == np.int64
        assert np.array_equal(synthetic[s].images, again[s].images)
        assert not np.array_equal(synthetic[s].images, other[s].images)
    assert load_splits('synthetic', image_size=12, seed=0)['val'].images.shape == (320, 12, 12, 3)


def test_synthetic_is_learnable_but_not_trivial(synthetic):
    # nearest class mean on raw pixels: well above chance (0.2), yet far from solved
    xs, ys, xq, yq = EpisodeSampler(synthetic['test'], 5, 5, 15, seed=0).sample(100)
    prototypes = xs.flatten(2).view(100, 5, 5, -1).mean(2)  # (T, N, D)
    accuracy = (torch.cdist(xq.flatten(2), prototypes).argmin(-1) == yq).float().mean()
    assert 0.5 < accuracy < 0.97


# ---------------------------------------------------------------------------- cache

def test_second_load_reads_the_cache(csv_root, tmp_path, monkeypatch):
    cache = tmp_path / 'cache'
    first = load_splits(str(csv_root), image_size=16, cache_dir=str(cache))
    assert len(list(cache.glob('*.npz'))) == 3

    def no_decoding(path, image_size):
        raise AssertionError(f'decoded {path} although it is cached')
    with monkeypatch.context() as m:
        m.setattr(data, '_read_image', no_decoding)
        second = load_splits(str(csv_root), image_size=16, cache_dir=str(cache))
    for s in data.SPLITS:
        assert np.array_equal(first[s].images, second[s].images) and first[s].classes == second[s].classes
        assert np.array_equal(first[s].labels, second[s].labels)
    load_splits(str(csv_root), image_size=12, cache_dir=str(cache))
    assert len(list(cache.glob('*.npz'))) == 6  # a new image size is a new key
    random_image(np.random.default_rng(9)).save(csv_root / 'images' / 'n0193011200000005.jpg')
    os.utime(csv_root / 'images' / 'n0193011200000005.jpg', ns=(1, 1))
    load_splits(str(csv_root), image_size=12, cache_dir=str(cache))
    assert len(list(cache.glob('*.npz'))) == 7  # a changed test image is a new key for test only
    assert not list(cache.glob('*.tmp'))


def test_corrupt_cache_is_rebuilt(csv_root, tmp_path):
    cache = tmp_path / 'cache'
    first = load_splits(str(csv_root), image_size=16, cache_dir=str(cache))
    for path in cache.glob('*.npz'):
        path.write_bytes(path.read_bytes()[:100])
    second = load_splits(str(csv_root), image_size=16, cache_dir=str(cache))
    assert np.array_equal(first['train'].images, second['train'].images)
    assert all(data._read_cache(p, 'x') is not None for p in cache.glob('*.npz'))


def test_pickle_cache(tmp_path, monkeypatch):
    make_pickle_folder(tmp_path / 'pkl', np.random.default_rng(1))
    first = load_splits(str(tmp_path / 'pkl'), image_size=6, cache_dir=str(tmp_path / 'cache'))
    monkeypatch.setattr(data, '_read_pickle', lambda *args: pytest.fail('unpickled a cached split'))
    second = load_splits(str(tmp_path / 'pkl'), image_size=6, cache_dir=str(tmp_path / 'cache'))
    assert np.array_equal(first['test'].images, second['test'].images)


# ---------------------------------------------------------------------------- episodes

def test_episode_shapes_and_labels(synthetic):
    xs, ys, xq, yq = EpisodeSampler(synthetic['train'], 5, 2, 3, seed=0).sample(4)
    assert xs.shape == (4, 10, 3, 28, 28) and xq.shape == (4, 15, 3, 28, 28)
    assert xs.dtype == xq.dtype == torch.float32 and ys.dtype == yq.dtype == torch.int64
    assert ys.shape == (4, 10) and yq.shape == (4, 15)
    assert 0 <= xs.min() and xs.max() <= 1 and xs.is_contiguous()
    for t in range(4):
        assert torch.bincount(ys[t]).tolist() == [2] * 5 and torch.bincount(yq[t]).tolist() == [3] * 5


def test_episode_indices(synthetic):
    split = unique_split()
    sampler = EpisodeSampler(split, 4, 3, 5, seed=0)
    support, query = sampler.sample_indices(50)
    for t in range(50):
        assert not set(support[t]) & set(query[t])  # support and query are disjoint
        assert len(set(support[t])) == 12 and len(set(query[t])) == 20
        classes = split.labels[support[t]].reshape(4, 3)  # class-major: one class per label
        assert (classes == classes[:, :1]).all() and len(set(classes[:, 0])) == 4
        assert (split.labels[query[t]].reshape(4, 5) == classes[:, :1]).all()
    first_classes = split.labels[support[:, 0]]
    assert len(set(first_classes.tolist())) > 1  # label 0 is not always the same class
    xs, ys, xq, yq = sampler.gather(support, query)
    assert torch.equal((xs[:, :, 0, 0, 0] * 255).round().long(), torch.from_numpy(support))  # pixels match
    assert torch.equal((xq[:, :, 1, 2, 3] * 255).round().long(), torch.from_numpy(query))


def test_episodes_are_deterministic_in_seed(synthetic):
    a = EpisodeSampler(synthetic['val'], 5, 1, 15, seed=3).sample(2)
    b = EpisodeSampler(synthetic['val'], 5, 1, 15, seed=3).sample(2)
    c = EpisodeSampler(synthetic['val'], 5, 1, 15, seed=4).sample(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_fixed_episodes(synthetic):
    a = fixed_episodes(synthetic['test'], 5, 1, 5, n_episodes=7, seed=0, batch=3)
    b = fixed_episodes(synthetic['test'], 5, 1, 5, n_episodes=7, seed=0, batch=3)
    assert len(a) == 3 and [batch[0].shape[0] for batch in a] == [3, 3, 1]
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    assert all(torch.equal(u, v) for u, v in zip(a[1], a[1]))  # the same on every access
    assert a[2][0].shape == (1, 5, 3, 28, 28) and a[2][3].shape == (1, 25)


# ---------------------------------------------------------------------------- errors

def test_missing_path():
    with pytest.raises(DataError, match='does not exist.*--data synthetic'):
        load_splits('/no/such/folder')


def test_unknown_layout(tmp_path):
    (tmp_path / 'train.csv').write_text('filename,label\n')
    with pytest.raises(DataError, match='matches no supported layout.*train.csv.*pkl.*class folders'):
        load_splits(str(tmp_path), cache_dir=str(tmp_path / 'cache'))


def test_missing_image_in_csv(csv_root, tmp_path):
    (csv_root / 'images' / 'n0185567200000006.jpg').unlink()
    with pytest.raises(DataError, match=r'n0185567200000006.jpg listed in .*val.csv does not exist'):
        load_splits(str(csv_root), image_size=16, cache_dir=str(tmp_path / 'cache'))


def test_bad_csv_header(csv_root, tmp_path):
    text = (csv_root / 'test.csv').read_text()
    (csv_root / 'test.csv').write_text(text.replace('filename,label', 'file,class'))
    with pytest.raises(DataError, match="test.csv must start with the header 'filename,label'"):
        load_splits(str(csv_root), image_size=16, cache_dir=str(tmp_path / 'cache'))


def test_truncated_image(csv_root, tmp_path):
    path = csv_root / 'images' / 'n0170432300000006.jpg'
    random_image(np.random.default_rng(0), 64).save(path)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(DataError, match='cannot read image .*n0170432300000006.jpg') as error:
        load_splits(str(csv_root), image_size=16, cache_dir=str(tmp_path / 'cache'))
    assert isinstance(error.value.__cause__, OSError)


def test_pickle_without_keys(tmp_path):
    make_pickle_folder(tmp_path / 'pkl', np.random.default_rng(1))
    with open(tmp_path / 'pkl' / 'mini-imagenet-cache-test.pkl', 'wb') as f:
        pickle.dump({'images': np.zeros((2, 4, 4, 3), np.uint8)}, f)
    with pytest.raises(DataError, match="cache-test.pkl must hold a dict with keys 'image_data'"):
        load_splits(str(tmp_path / 'pkl'), image_size=4, cache_dir=str(tmp_path / 'cache'))


def test_too_few_classes_or_images():
    split = unique_split(n_classes=6, per_class=8)
    with pytest.raises(DataError, match='train split has 6 classes.*lower --ways to at most 6'):
        check_split(split, ways=7, shots=1, queries=1)
    with pytest.raises(DataError, match=r'class c0 of the train split has 8 images.*= 5 \+ 4 = 9'):
        EpisodeSampler(split, ways=5, shots=5, queries=4, seed=0)
    check_split(split, ways=6, shots=5, queries=3)


# ---------------------------------------------------------------------------- autometa.py

def cli(*args, cwd=HERE):
    """Run the command line in a subprocess, as a user would."""
    return subprocess.run([sys.executable, os.path.join(HERE, "autometa.py"), *args], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=300)


# A tiny search, with its number of workers said: without --workers a search starts one per core.
TINY = ["--blocks", "2", "--beam", "2", "--max-first", "3", "--meta-iters", "3", "--eval-episodes", "4",
        "--channels", "4", "--probe", "1", "--noise", "1", "--noise-seeds", "2", "--rescore", "2",
        "--rescore-seeds", "1", "--rescore-iters", "3", "--workers", "1"]


@pytest.mark.slow
def test_tiny_search_end_to_end_writes_a_valid_log_and_resumes_without_retraining(tmp_path, capsys):
    out, budget = str(tmp_path / "run"), ["--max-params", "700"]
    count = functools.partial(cells.parameter_count, n_way=5, image_size=28, channels=4)
    sampled = [c for c in pnas.first_level(cells.OPS, 3, seed=0) if count(c) <= 700]
    assert 0 < len(sampled) < 3 and cells.CONV4_CELL not in sampled  # the budget drops one of the 3 sampled
    first = cli("--search", "--out", out, *TINY, *budget)
    assert first.returncode == 0, first.stderr
    log = read_lines(os.path.join(out, "search.jsonl"))
    n1 = len(sampled) + 1  # and conv4
    assert all(r["status"] == "ok" and 0 <= r["accuracy"] <= 1 for r in log)
    assert all(r["params"] == count(pnas.as_cell(r["cell"])) and r["seconds"] > 0 for r in log)
    assert all(r["params"] <= 700 for r in log if r["role"] != "baseline")
    roles = [r["role"] for r in log]  # within a level in the order results arrive: the workers race
    assert sorted(roles[:n1]) == ["baseline"] + ["first"] * (n1 - 1)
    assert roles[n1:n1 + 1] + sorted(roles[n1 + 1:n1 + 4]) == ["noise"] + ["beam"] * 2 + ["probe"]
    assert [pnas.as_cell(r["cell"]) for r in log if r["role"] == "baseline"] == [cells.CONV4_CELL]
    assert [r["predicted"] is None for r in log[:n1 + 4]] == [True] * (n1 + 1) + [False] * 3
    noise = log[n1]  # right after level 1, its best cell again with another seed on the same episodes
    assert noise["cell"] in [r["cell"] for r in log[:n1] if r["accuracy"] == max(x["accuracy"] for x in log[:n1])]
    assert noise["seed"] != next(r["seed"] for r in log[:n1] if r["cell"] == noise["cell"])
    best = json.loads(open(os.path.join(out, "best.json")).read())
    assert best["config"]["blocks"] == 2 and cells.parse_cell(best["cell"]) and best["skeleton"] == cells.SKELETON
    assert best["params"] == count(pnas.as_cell(best["cell"]))
    rescored = {json.dumps(r["cell"]): r for r in log[n1 + 4:]}  # after the levels
    assert roles[n1 + 4:] == ["rescore"] * len(rescored) and json.dumps(list(map(list, cells.CONV4_CELL))) in rescored
    assert best["rescore"]["accuracy"] == max(r["accuracy"] for r in rescored.values())  # chosen by the re-score
    assert best["rescore"]["seeds"] == [rescored[json.dumps(best["cell"])]["seed"]]
    assert "best cell:" in first.stdout and "[level 2/2]" in first.stdout and "seed noise:" in first.stdout
    conv4 = rescored[json.dumps(list(map(list, cells.CONV4_CELL)))]
    verdict = first.stdout.splitlines()[-2]
    assert f"re-scored {100 * conv4['accuracy']:.2f}%" in verdict and verdict.endswith(
        "The best cell is conv4 itself: no searched cell beat it." if best["cell"] == conv4["cell"] else
        f"re-scored on the same episodes, beat it by {100 * (best['rescore']['accuracy'] - conv4['accuracy']):.2f} points, "
        "on one re-score, which cannot separate it from conv4.")
    assert verdict in open(os.path.join(out, "report.md")).read()  # one verdict, in both places
    report_md = open(os.path.join(out, "report.md")).read()
    assert "re-scored" in report_md and f"conv4 in this space: {100 * log[[r['role'] for r in log].index('baseline')]['accuracy']:.2f}%" in report_md
    capsys.readouterr()
    with one_thread():  # the same command resumed, here rather than in another process
        assert autometa.main(["--search", "--out", out, *TINY, *budget]) == 0
    assert capsys.readouterr().out.count("logged") == n1 + 3
    assert read_lines(os.path.join(out, "search.jsonl")) == log


def test_candidate_scores_do_not_depend_on_search_order():
    cfg = config.Config(ways=3, shots=1, queries=2, channels=4, meta_iters=2, eval_episodes=3, meta_batch=1,
                          image_size=28)
    splits = data.synthetic_splits(28, 0)
    score = scoring.make_scorer(cfg, splits, torch.device("cpu"))
    a, b = ((1, "conv_3x3", 0, "identity"),), ((0, "max_pool_3x3", 1, "avg_pool_3x3"),)
    first = score(pnas.canonical(a))
    score(pnas.canonical(b))
    assert score(pnas.canonical(a)) == first
    # the same cell, halves swapped: one network, one spelling inside the search, one score
    assert score(pnas.canonical(((0, "identity", 1, "conv_3x3"),))) == first


def test_common_draws_give_every_cell_the_same_task_stream_episodes_and_shared_initial_weights(monkeypatch):
    cfg = config.Config(ways=3, shots=1, queries=2, channels=4, meta_iters=2, eval_episodes=3, meta_batch=1,
                        image_size=28, draws="common")
    splits = data.synthetic_splits(28, 0)
    conv4, chain = cells.CONV4_CELL, ((1, "conv_3x3", 1, "none"), (2, "conv_3x3", 2, "none"))
    assert scoring.candidate_seed(0, conv4, 0, "common") == scoring.candidate_seed(0, chain, 0, "common")
    assert scoring.candidate_seed(0, conv4, 1, "common") != scoring.candidate_seed(0, conv4, 0, "common")
    assert scoring.candidate_seed(0, conv4, 0, "own") != scoring.candidate_seed(0, chain, 0, "own")
    seen = {}  # cell -> (its first weights, every task batch it meta-trained on, every episode it was scored on)

    def meta_train(model, optimizer, sample, iterations, *args, **kwargs):
        seen[cell] = [{k: v.detach().clone() for k, v in model.named_parameters()},
                      [sample() for _ in range(iterations)], None]

    def evaluate(model, params, episodes, *args):
        seen[cell][2] = list(episodes)
        return 0.5, 0.1

    monkeypatch.setattr(maml, "meta_train", meta_train)
    monkeypatch.setattr(maml, "evaluate", evaluate)
    score = scoring.make_scorer(cfg, splits, torch.device("cpu"))
    for cell in (conv4, chain):
        score(cell)
    (w4, tasks4, episodes4), (w2, tasks2, episodes2) = seen[conv4], seen[chain]
    for a, b in itertools.chain(zip(tasks4, tasks2), zip(episodes4, episodes2)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))  # the same images, labels and class order
    shared = [name for name in w4 if name in w2 and w4[name].shape == w2[name].shape]
    assert {"stem.0.weight", "cells.0.ops.0.1.weight", "classifier.weight"} <= set(shared)
    assert all(torch.equal(w4[name], w2[name]) for name in shared)  # the stem, the first op, the head
    assert not torch.equal(w2["cells.0.ops.1.1.weight"], w2["cells.0.ops.0.1.weight"])  # each layer its own draw
    # drawn as torch draws a fresh layer: the same distribution (kaiming uniform), bound sqrt(1 / fan_in)
    assert w4["stem.0.weight"].abs().max() <= (1 / 27) ** 0.5
    cfg.draws, cell = "own", conv4
    score(cell)
    assert not torch.equal(seen[conv4][0]["stem.0.weight"], w4["stem.0.weight"])
    assert not all(torch.equal(x, y) for x, y in zip(seen[conv4][1][0], tasks4[0]))


def test_a_candidate_trained_on_from_its_kept_state_ends_as_one_trained_that_long_from_the_start(tmp_path, monkeypatch):
    cfg = config.Config(ways=3, shots=1, queries=2, channels=4, meta_iters=6, eval_episodes=3, meta_batch=2,
                        image_size=28, draws="common")  # a screen's training, below meta_iters, is kept
    splits, cell = data.synthetic_splits(28, 0), ((1, "conv_3x3", 1, "sep_conv_3x3"),)
    calls, meta_train = [], maml.meta_train

    def watched(model, optimizer, sample, iterations, *args, start=0, **kwargs):
        calls.append((start, iterations))
        return meta_train(model, optimizer, sample, iterations, *args, start=start, **kwargs)

    monkeypatch.setattr(maml, "meta_train", watched)
    halving = scoring.make_scorer(cfg, splits, torch.device("cpu"), keep=str(tmp_path / "halving"))
    whole = scoring.make_scorer(cfg, splits, torch.device("cpu"), keep=str(tmp_path / "whole"))
    with one_thread():
        low = halving(cell, meta_iters=2)
        high = halving(cell, meta_iters=5)   # trained on from iteration 2
        straight = whole(cell, meta_iters=5)  # from scratch
        again = halving(cell, meta_iters=3)   # fewer than kept: from scratch, as asked
    assert calls == [(0, 2), (2, 5), (0, 5), (0, 3)]
    assert low["meta_iters"] == 2 and high["meta_iters"] == 5 and high == straight and again["meta_iters"] == 3
    kept = [torch.load(next((tmp_path / name).iterdir()), weights_only=True) for name in ("halving", "whole")]
    assert kept[0]["iteration"] == 3 and kept[1]["iteration"] == 5
    with one_thread():
        halving(cell, meta_iters=5)
    kept[0] = torch.load(next((tmp_path / "halving").iterdir()), weights_only=True)
    for name, weight in kept[1]["model"].items():  # the same weights, bit for bit, and the same Adam moments
        assert torch.equal(kept[0]["model"][name], weight), name
    assert all(torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in zip(kept[0]["optimizer"]["state"].values(),
                                                                           kept[1]["optimizer"]["state"].values()))


def test_a_search_folder_of_the_objective_before_common_draws_is_refused_in_one_sentence(tmp_path):
    cfg = config.make_config({"out": str(tmp_path)})
    config.check_resume(cfg)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["draws"]  # as written before --draws existed: each candidate drew its own tasks and weights
    write_json(str(tmp_path / "config.json"), saved)
    kept = (tmp_path / "config.json").read_text()
    with pytest.raises(config.ConfigError, match=r"was written by an earlier autometa, which had no draws setting\(s\): "
                                                 r"pass a new --out to search with this version$"):
        config.check_resume(cfg)
    assert (tmp_path / "config.json").read_text() == kept


def test_a_screen_is_scored_on_the_first_of_the_search_episodes(monkeypatch):
    cfg = config.Config(ways=3, shots=1, queries=2, channels=4, meta_iters=2, eval_episodes=5, meta_batch=2,
                        image_size=28)
    splits, seen = data.synthetic_splits(28, 0), []
    monkeypatch.setattr(maml, "evaluate", lambda model, params, episodes, *args: seen.append(list(episodes)) or (0.5, 0))
    score = scoring.make_scorer(cfg, splits, torch.device("cpu"))
    score(cells.CONV4_CELL)
    score(cells.CONV4_CELL, episodes=3, meta_iters=1)
    everything, first = seen  # 5 episodes in batches of 2: 3 batches; the first 3 episodes: the first 2 batches
    assert len(everything) == 3 and len(first) == 2
    assert all(torch.equal(a, b) for x, y in zip(everything, first) for a, b in zip(x, y))


def test_fidelity_figures_against_hand_computed_ones():
    trained = {"a": [0.9, 0.8], "b": [0.7, 0.7], "c": [0.5, 0.6], "d": [0.2, 0.3]}
    same = {"a": [0.6, 0.5, 0.7], "b": [0.5, 0.4, 0.6], "c": [0.4, 0.3, 0.5], "d": [0.3, 0.2, 0.4]}
    f = fidelity.fidelity(same, trained)
    assert f["spearman_one_seed"] == [1.0, 1.0, 1.0] and f["spearman_mean_of_seeds"] == 1.0
    assert f["seeds_agreement"] == 1.0 and f["first_objective"] == f["first_trained"] == "a"
    # trial 1 swaps a and b, trial 2 ranks them all backwards: Spearman 1 - 6 * sum(d^2) / (n (n^2 - 1))
    mixed = {"a": [0.6, 0.4, 0.1], "b": [0.5, 0.5, 0.2], "c": [0.4, 0.3, 0.3], "d": [0.3, 0.2, 0.4]}
    f = fidelity.fidelity(mixed, trained)
    assert f["spearman_one_seed"] == [1.0, pytest.approx(1 - 6 * 2 / 60), -1.0]
    assert f["seeds_agreement"] == pytest.approx(((1 - 6 * 2 / 60) - 1 + -(1 - 6 * 2 / 60)) / 3, abs=1e-3)
    assert f["first_objective"] == "b" and f["first_trained"] == "a"  # means 0.367 against 0.4 for b
    assert "close" not in f  # no conv4 to be close to
    f = fidelity.fidelity(dict(mixed, conv4=[0.35, 0.45, 0.25]), dict(trained, conv4=[0.64, 0.64]))
    assert f["close"]["cells"] == ["a", "b", "c", "conv4"]  # d trains 39 points below conv4, c 9
    assert f["close"]["spearman_one_seed"][0] == pytest.approx(1 - 6 * 2 / 60)  # a b c conv4, against a b conv4 c


@pytest.mark.slow
def test_bench_objective_trains_the_panel_once_as_eval_tests_it_and_scores_it_with_three_seeds(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fidelity, "PANEL", {name: fidelity.PANEL[name] for name in ("conv4", "chain", "sep")})
    monkeypatch.setattr(fidelity, "TEST_EPISODES", 4)
    out = tmp_path / "objective"
    args = ["--bench", "objective", "--out", str(out), "--ways", "3", "--queries", "2", "--channels", "4",
            "--meta-iters", "2", "--eval-episodes", "3", "--train-iters", "2", "--val-every", "1",
            "--val-episodes", "2", "--meta-batch", "1"]
    with one_thread():
        assert autometa.main(args) == 0
    printed = capsys.readouterr().out
    assert "all cells: Spearman, objective vs trained: one seed" in printed and "s per score (9 scores)" in printed
    trained = json.loads((out / "trained.json").read_text())["cells"]
    assert set(trained) == {"conv4", "chain", "sep"}
    with one_thread():  # the panel's test accuracies are what --eval says of its checkpoints
        assert autometa.main(["--eval", str(out / "train-chain"), "--eval-episodes", "4"]) == 0
    said = [float(x) / 100 for x in re.findall(r"test accuracy: ([\d.]+)%", capsys.readouterr().out)]
    assert said == pytest.approx(trained["chain"]["test"], abs=5e-5)
    row = json.loads((out / "objective.jsonl").read_text())
    assert row["draws"] == "common" and len(row["objective"]["sep"]) == 3 and row["trained"]["sep"] == trained["sep"]["test"]
    monkeypatch.setattr(fidelity.training, "train", None)  # a second run, with another objective, trains nothing
    saved = json.loads((out / "trained.json").read_text())
    saved["settings"]["screen_iters"] = 99  # nor does a panel written with other settings of the search alone
    saved["settings"].pop("rescore_iters", None)
    (out / "trained.json").write_text(json.dumps(saved))
    with one_thread():
        assert autometa.main(args + ["--meta-iters", "3", "--screen-iters", "5"]) == 0
    rows = [json.loads(line) for line in (out / "objective.jsonl").read_text().splitlines()]
    assert [r["meta_iters"] for r in rows] == [2, 3] and rows[1]["trained"] == rows[0]["trained"]
    capsys.readouterr()
    assert autometa.main(args + ["--channels", "6"]) == 2  # a panel trained with other settings
    assert "holds a panel trained with other settings (channels)" in capsys.readouterr().err


@pytest.mark.slow
def test_help_and_draw_load_none_of_what_other_commands_run(tmp_path):
    # torch 2.13 imports torch.distributed itself, so what is checked is autometa's own modules
    heavy = ("bench", "team", "training", "fidelity", "fastcpu", "report")
    for args in (["--help"], ["--draw", "conv4", "--out", str(tmp_path / "c.png")]):
        code = (f"import sys, autometa\ntry:\n    autometa.main({args!r})\nexcept SystemExit:\n    pass\n"
                f"print([m for m in {heavy!r} if m in sys.modules])")
        result = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=child_env(), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0 and result.stdout.splitlines()[-1] == "[]", (args, result.stdout, result.stderr)


@pytest.mark.slow
def test_inspect_prints_one_line_per_split(tmp_path, capsys):
    result = cli("--inspect")
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["train: 64 classes, 1280 images, 28x28",
                                          "val: 16 classes, 320 images, 28x28", "test: 20 classes, 400 images, 28x28"]
    root = make_csv_folder(tmp_path / "mini", np.random.default_rng(0))
    capsys.readouterr()
    assert autometa.main(["--inspect", "--data", str(root), "--image-size", "16", "--cache-dir", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "train: 3 classes, 13 images, 16x16"


@pytest.mark.slow
def test_synthetic_data_is_learnable_by_maml():
    torch.manual_seed(0)
    splits = data.synthetic_splits(28, 0)
    model = cells.build_network(cells.CONV4_CELL, 5, 28)
    sampler = data.EpisodeSampler(splits["train"], 5, 1, 5, seed=0)
    maml.meta_train(model, torch.optim.Adam(model.parameters(), 3e-3), lambda: sampler.sample(2), 60, 1, 0.1,
                    first_order=True)
    episodes = data.fixed_episodes(splits["test"], 5, 1, 5, 40, seed=1, batch=10)
    accuracy, ci95 = maml.evaluate(model, dict(model.named_parameters()), episodes, 3, 0.1)
    assert accuracy - ci95 > 0.35  # chance is 0.20


@pytest.mark.parametrize("args, words", [
    (["--search", "--data", "/no/such/folder"], "does not exist"),
    (["--search", "--data", os.path.join(HERE, "README.md")], "is a file, not a folder"),
    (["--search", "--blocks", "0"], "--blocks is 0"),
    (["--search", "--channels", "-4"], "--channels is -4"),
    (["--search", "--ways", "30"], "--ways"),
    (["--search", "--shots", "15", "--queries", "15"], "--shots"),
    (["--search", "--ops", "conv_3x3,conv_9x9"], "conv_9x9"),
    (["--search", "--device", "cuda:0"] if not torch.cuda.is_available() else ["--search", "--device", "tpu"], "--device"),
    (["--search", "--inner-lr", "0"], "--inner-lr"),
])
def test_bad_input_exits_2_with_one_sentence(tmp_path, capsys, args, words):
    with one_thread():  # here, not in a subprocess: a search sets the thread count before it reads its data
        assert autometa.main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert words in err and err.startswith("autometa: error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "search.jsonl").exists()


@pytest.mark.slow
def test_unknown_layout_and_changed_config_exit_2_and_keep_the_log(tmp_path, capsys, one_worker):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    out = tmp_path / "run"
    shutil.copytree(one_worker, out)  # a finished tiny search
    before = {name: (out / name).read_bytes() for name in ("search.jsonl", "config.json", "best.json")}
    for args, words in [(["--search", "--data", str(tmp_path / "junk"), "--out", str(tmp_path / "o1")], "layout"),
                        (["--search", "--out", str(out), *TINY, "--channels", "6"], "different settings (channels)"),
                        (["--train", "conv4", "--out", str(out)], "another kind")]:
        with one_thread():
            assert autometa.main(args) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    assert {name: (out / name).read_bytes() for name in before} == before


def test_results_of_the_old_network_around_the_cell_are_refused_not_mixed(tmp_path, capsys):
    old = {k: v for k, v in config.config_dict(config.make_config({})).items() if k != "skeleton"}
    search = tmp_path / "search"
    search.mkdir()
    write_json(search / "config.json", {"run": "search", **old})
    (search / "search.jsonl").write_text(json.dumps(dict(level=1, cell=[[1, "conv_3x3", 1, "identity"]], blocks=1,
                                                         accuracy=0.5, ci95=0.1, status="ok", role="first")) + "\n")
    best = tmp_path / "best.json"
    write_json(best, {"cell": [[1, "conv_3x3", 1, "identity"]], "accuracy": 0.5, "config": old})
    checkpoint = tmp_path / "best.pt"
    torch.save({"model": {}, "config": old, "arch": "conv4", "iteration": 1}, checkpoint)
    kept = {p: p.read_bytes() for p in (search / "config.json", search / "search.jsonl", best, checkpoint)}
    for args in (["--search", "--out", str(search)], ["--train", str(best), "--out", str(tmp_path / "t")],
                 ["--eval", str(checkpoint)]):
        assert autometa.main(args) == 2
        err = capsys.readouterr().err
        assert "old network around" in err and len(err.strip().splitlines()) == 1, err
    assert all(p.read_bytes() == b for p, b in kept.items()) and not (tmp_path / "t").exists()
    with pytest.raises(config.ConfigError, match="old network"):
        config.make_config({}, base=old)


def test_a_log_scored_as_other_networks_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    cfg = config.make_config({"out": str(out)})
    row = dict(level=1, cell=[[1, "conv_3x3", 1, "none"]], blocks=1, accuracy=0.5, ci95=0.1, status="ok", role="first",
               params=scoring.parameters(cfg, cells.CONV4_CELL) + 1)
    (out / "search.jsonl").write_text(json.dumps(row) + "\n")
    before = (out / "search.jsonl").read_text()
    assert autometa.main(["--search", "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "scored as a network of 28,934 parameters, which has 28,933 here" in err and len(err.strip().splitlines()) == 1
    assert (out / "search.jsonl").read_text() == before


# ---------------------------------------------------------------------------- --train and --eval

TRAIN = ["--ways", "3", "--queries", "2", "--val-episodes", "4", "--eval-episodes", "6", "--val-every", "3",
         "--log-every", "1", "--channels", "4"]


@pytest.mark.slow
def test_resumed_training_equals_uninterrupted_training(tmp_path, capsys):
    arch = str(tmp_path / "cell.json")
    open(arch, "w").write(json.dumps([[1, "conv_3x3", 0, "max_pool_3x3"]]))
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert autometa.main(["--train", arch, "--out", whole, "--train-iters", "6", *TRAIN]) == 0
    assert autometa.main(["--train", arch, "--out", parts, "--train-iters", "3", *TRAIN]) == 0
    assert autometa.main(["--train", arch, "--out", parts, "--train-iters", "6", *TRAIN]) == 0
    assert "resuming from" in capsys.readouterr().out
    a = torch.load(os.path.join(whole, "last.pt"), weights_only=True)
    b = torch.load(os.path.join(parts, "last.pt"), weights_only=True)
    assert a["iteration"] == b["iteration"] == 6 and a["history"] == b["history"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    rows = read_lines(os.path.join(parts, "train.jsonl"))
    assert [r["iteration"] for r in rows] == list(range(1, 7))
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_lines(os.path.join(whole, "train.jsonl"))]


@pytest.mark.slow
def test_eval_is_deterministic_and_needs_only_the_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    with one_thread():
        assert autometa.main(["--train", "conv4", "--out", out, "--train-iters", "3", *TRAIN]) == 0
    state = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert {"model", "optimizer", "iteration", "config", "arch", "history"} <= set(state)
    with Image.open(os.path.join(out, "train.png")) as image:
        assert image.size == report.TRAINING_SIZE
    first = cli("--eval", os.path.join(out, "best.pt"), cwd=str(tmp_path))  # no flags, another folder
    second = cli("--eval", os.path.join(out, "best.pt"), cwd=str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.splitlines()[0] == f"testing {os.path.join(out, 'best.pt')} on 6 test episodes, 3-way 1-shot, device cpu"
    assert first.stdout.splitlines()[1].startswith("test accuracy: ") and "(95% CI, 6 episodes)" in first.stdout


@pytest.mark.slow
def test_train_on_several_seeds_and_eval_their_folder(tmp_path, capsys):
    out = str(tmp_path / "seeds")
    with one_thread():
        assert autometa.main(["--train", "conv4", "--out", out, "--seeds", "0,1", "--train-iters", "3", *TRAIN]) == 0
    a, b = (torch.load(os.path.join(out, f"seed-{s}", "best.pt"), weights_only=True) for s in (0, 1))
    assert a["config"]["seed"] == b["config"]["seed"] == 0  # the data and the episodes stay --seed's
    assert not torch.equal(a["model"]["stem.0.weight"], b["model"]["stem.0.weight"])  # the training seed differs
    result = cli("--eval", out, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if ": testing " not in line]
    assert lines[0].startswith("seed 0: test accuracy: ") and lines[1].startswith("seed 1: test accuracy: ")
    assert lines[2].startswith("mean over 2 seeds: ") and "std across seeds" in lines[2]
    capsys.readouterr()
    with one_thread():  # here, on one thread as the command above
        assert autometa.main(["--eval", os.path.join(out, "seed-1", "best.pt")]) == 0
    assert capsys.readouterr().out.split("test accuracy: ")[1] == lines[1].split("test accuracy: ")[1] + "\n"
    assert autometa.main(["--train", "conv4", "--out", str(tmp_path / "bad"), "--seeds", "0,x"]) == 2
    err = capsys.readouterr().err
    assert "--seeds" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad" / "seed-0").exists()


@pytest.mark.slow
def test_missing_or_corrupt_checkpoint_exits_2(tmp_path, capsys):
    result = cli("--eval", str(tmp_path / "nothing.pt"))  # once as a user would, in a process of its own
    assert result.returncode == 2 and "does not exist" in result.stderr and len(result.stderr.splitlines()) == 1
    (tmp_path / "bad.pt").write_bytes(b"\x80\x04 not a checkpoint")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    (tmp_path / "cell.json").write_text('[[0, "conv_3x3", 7, "identity"]]')
    for args, words in [(["--eval", str(tmp_path / "bad.pt")], "cannot be read"),
                        (["--eval", str(tmp_path / "other.pt")], "not an autometa checkpoint"),
                        (["--train", str(tmp_path / "cell.json"), "--out", str(tmp_path / "t")], "input 7")]:
        assert autometa.main(args) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "bad.pt").read_bytes() == b"\x80\x04 not a checkpoint" and not (tmp_path / "t").exists()


# ---------------------------------------------------------------------------- reliability

def bad_folders(root):
    """One folder per kind of broken dataset a user may point --data at."""
    rng = np.random.default_rng(0)
    cases = {}
    missing = make_csv_folder(root / "missing_image", rng)
    os.remove(next((missing / "images").iterdir()))
    cases["missing_image"] = (missing, "does not exist")
    truncated = make_csv_folder(root / "truncated", rng)
    victim = sorted((truncated / "images").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:60])
    cases["truncated"] = (truncated, victim.name)
    (root / "pickle").mkdir()
    for split in ("train", "val", "test"):
        with open(root / "pickle" / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"images": np.zeros((2, 4, 4, 3), np.uint8)}, f)
    cases["pickle_keys"] = (root / "pickle", "image_data")
    return cases


def test_broken_datasets_exit_2_before_any_training(tmp_path, capsys):
    for name, (folder, words) in bad_folders(tmp_path).items():
        out = tmp_path / f"out_{name}"
        code = autometa.main(["--search", "--data", str(folder), "--out", str(out), "--cache-dir", str(tmp_path / "c")])
        err = capsys.readouterr().err
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not (out / "search.jsonl").exists()


@pytest.mark.parametrize("args, words", [
    (["--search", "--max-first", "-1"], "--max-first"),
    (["--search", "--meta-iters", "0"], "--meta-iters"),
    (["--search", "--ways", "1"], "--ways"),
    (["--train", "conv4", "--image-size", "8"], "at least 16x16"),
    (["--train", "no_such_arch"], "neither a built-in"),
])
def test_more_bad_flags_exit_2(tmp_path, capsys, args, words):
    assert autometa.main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_out_that_is_a_file_and_malformed_cell_json_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert autometa.main(["--search", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "file").read_text() == "mine"
    (tmp_path / "cell.json").write_text("[[1, 'conv_3x3']")
    assert autometa.main(["--train", str(tmp_path / "cell.json"), "--out", str(tmp_path / "t")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def start(args, **kw):
    """Start `args` (a command line after python) as a user would, with stdout (unbuffered) and stderr kept."""
    return subprocess.Popen([sys.executable, *args], cwd=HERE, env=child_env(PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for_lines(path, n, proc, seconds=240):
    """Wait until the file has n lines (the run is then training the next candidate)."""
    deadline = time.time() + seconds
    while not (path.exists() and path.read_text().count("\n") >= n):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


def left_behind(out):
    """Processes of this machine whose command line names `out`: none may outlive a stopped run."""
    deadline = time.time() + 10  # a stopped worker may take a moment to be reaped
    while time.time() < deadline:
        found = subprocess.run(["pgrep", "-f", f"--out {out}"], capture_output=True, text=True).stdout.split()
        if not found:
            return []
        time.sleep(0.1)
    return found


@pytest.mark.parametrize("workers, how, status", [("1", signal.SIGINT, 130), ("2", signal.SIGTERM, 143),
                                                  ("2", signal.SIGKILL, -9), ("torchrun", signal.SIGINT, None)],
                         ids=["ctrl-c-one-process", "sigterm-two-workers", "rank-0-killed", "ctrl-c-torchrun"])
@pytest.mark.slow
def test_a_stopped_search_says_so_in_one_line_leaves_no_process_and_resumes_to_the_same_log(
        tmp_path, one_worker, workers, how, status):
    out = tmp_path / "run"
    if workers == "torchrun":  # Ctrl-C in a terminal signals the whole process group: torchrun and its ranks
        proc = start(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "autometa.py", "--search",
                      "--out", str(out), *TINY], start_new_session=True)
    else:
        proc = start(["autometa.py", "--search", "--out", str(out), *TINY, "--workers", workers])
    wait_for_lines(out / "search.jsonl", 2, proc)
    os.killpg(proc.pid, how) if workers == "torchrun" else proc.send_signal(how)
    _, err = proc.communicate(timeout=120)
    ours = [line for line in err.splitlines() if line.startswith("autometa:")]
    resume = f"every result so far is in {out}/search.jsonl: rerun the same command to resume"
    if how == signal.SIGKILL:  # rank 0 had no word to say: its worker says it
        assert ours == [f"autometa: search failed: rank 1 lost rank 0, which ended without a word: if the system killed "
                        "it for lack of memory (the out-of-memory killer), use fewer --workers or a smaller preset; "
                        + resume]
    else:
        by = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}[how]
        assert ours == [f"autometa: stopped by {by}; {resume}"], err
    if status is not None:
        assert proc.returncode == status and err.strip().splitlines() == ours, err
    assert "autometa.py" not in err and "team.py" not in err  # torchrun tells its own story, no traceback of ours
    assert left_behind(out) == []
    with one_thread():  # the same command, here (a subprocess would only add torch's import)
        assert autometa.main(["--search", "--out", str(out), *TINY, "--workers", "1"]) == 0
    assert_same_search(out, one_worker)


@pytest.mark.slow
def test_a_stopped_train_checkpoint_eval_and_bench_end_in_one_line(tmp_path, capsys, whole_training):
    out = tmp_path / "run"
    with open(tmp_path / "stderr", "w") as stderr:  # stopped halfway through writing its second last.pt
        child = subprocess.Popen([sys.executable, "-c", STOP_AT, "last.pt", "2", *train_args(out)], cwd=HERE,
                                 env=child_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    _, status = os.waitpid(child.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)
    child.send_signal(signal.SIGTERM)
    child.send_signal(signal.SIGCONT)
    assert child.wait(60) == 143
    assert (tmp_path / "stderr").read_text() == (f"autometa: stopped by SIGTERM; the checkpoints so far are in {out}: "
                                                  "rerun the same command to resume from the last one\n")
    assert not [name for name in os.listdir(out) if name.endswith(files.PARTIAL)]  # the half-written file is gone
    with one_thread():
        assert autometa.main(train_args(out)) == 0
    assert_same_training(out, whole_training)
    for args, how in [(["--eval", str(out / "best.pt"), "--eval-episodes", "100000"], signal.SIGTERM),
                      (["--bench", "search", "--channels", "4", "--out", str(tmp_path / "bench")], signal.SIGINT)]:
        proc = start(["autometa.py", *args])
        assert proc.stdout.readline()  # it has started: past the imports, into the command
        proc.send_signal(how)
        _, err = proc.communicate(timeout=120)
        by = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}[how]
        assert proc.returncode == 128 + how and err == f"autometa: stopped by {by}\n", err
    assert left_behind(tmp_path / "bench") == []
    proc = start(["autometa.py", "--inspect"])
    time.sleep(0.5)  # still loading torch
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "autometa: stopped by Ctrl-C (SIGINT) while starting\n", err


# ---------------------------------------------------------------------------- run folders (files.py)

def test_out_or_cache_dir_under_a_file_exits_2_naming_the_file(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    mini = make_csv_folder(tmp_path / "mini", np.random.default_rng(0))
    for args, words in [(["--search", "--out", f"{notes}/run"], f"{notes} is a file, not a folder; pass --out"),
                        (["--train", "conv4", "--out", f"{notes}/run"], f"{notes} is a file, not a folder"),
                        (["--train", "conv4", "--out", str(notes)], f"cannot write {notes}: it is a file, not a folder"),
                        (["--draw", "autometa", "--out", f"{notes}/cell.png"], f"{notes} is a file, not a folder"),
                        (["--inspect", "--data", str(mini), "--cache-dir", f"{notes}/cache"],
                         f"{notes} is a file, not a folder; pass --cache-dir a path outside it"),
                        (["--inspect", "--data", str(mini), "--cache-dir", str(notes)],
                         f"cannot write {notes}: it is a file, not a folder; pass --cache-dir a folder")]:
        assert autometa.main(args) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    assert notes.read_text() == "mine"


UNWRITABLE = r'''
"""Make the folder spec["disk"] unwritable in the way spec["kind"] says, with the content of spec["src"]
(a full disk keeps 16 KiB free: room for small files, not for a checkpoint); run each command line of
spec["argvs"] with autometa.main; copy the disk to spec["after"]; print each exit status and stderr."""
import builtins, contextlib, errno, io, json, os, shutil, subprocess, sys
spec = json.loads(sys.argv[1])
disk, kind, how = spec["disk"], spec["kind"], spec["how"]
code = {"denied": errno.EACCES, "read-only": errno.EROFS, "full": errno.ENOSPC}[kind]


def failing(call, writes):
    """`call`, failing with `code` where it would write under the disk: a fault injected, for a machine
    where no test may mount a file system."""
    def wrapped(path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(disk + os.sep) \
                and writes(*args, **kwargs):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return call(path, *args, **kwargs)
    return wrapped


def chmod_all(dirs, files):
    for root, _, names in os.walk(disk):
        os.chmod(root, dirs)
        for name in names:
            os.chmod(os.path.join(root, name), files)


if how == "mount" and kind == "full":
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", disk], check=True)
shutil.copytree(spec["src"], disk, dirs_exist_ok=True)
if how == "chmod":  # really denied: the test dropped root's power to write anywhere
    chmod_all(0o555, 0o444)
elif how == "inject":
    builtins.open = failing(builtins.open, lambda mode="r", *a, **k: any(c in mode for c in "wax+"))
    os.open = failing(os.open, lambda flags, *a, **k: flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    os.mkdir = failing(os.mkdir, lambda *a, **k: True)
elif kind == "read-only":  # the disk folder bound read-only onto itself, in this process's own mount namespace
    subprocess.run(["mount", "--bind", disk, disk], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", disk], check=True)
else:  # fill the small tmpfs to the last byte, then free 16 KiB
    fd = os.open(os.path.join(disk, ".filler"), os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, bytes(65536))
    os.ftruncate(fd, os.fstat(fd).st_size - 16384)
import autometa
results = []
for argv in spec["argvs"]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        results.append({"status": autometa.main(argv), "err": err.getvalue()})
if how == "chmod":
    chmod_all(0o755, 0o644)
shutil.copytree(disk, spec["after"], ignore=shutil.ignore_patterns(".filler"))
print(json.dumps(results))
'''
UNSHARE = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
# root writes anywhere: this drops that power (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) and runs the command
WITHOUT_ROOTS_POWER = ("import ctypes, os, sys; prctl = ctypes.CDLL(None).prctl; "
                       "assert all(prctl(24, cap, 0, 0, 0) == 0 for cap in (1, 2)); os.execv(sys.argv[1], sys.argv[1:])")


@functools.cache
def can_mount():
    """Whether a test may mount a file system here, in a mount namespace of its own that nothing else sees."""
    with tempfile.TemporaryDirectory() as folder:
        return shutil.which("unshare") is not None and subprocess.run(
            [*UNSHARE, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", folder], capture_output=True).returncode == 0


def run_unwritable(kind, disk, src, after, argvs):
    """Each command line of `argvs` on the folder `disk`, holding what `src` holds, made unwritable for real:
    write permission taken away, or a read-only or full file system mounted where the machine allows it
    (else an injected OSError); returns the commands' results, and leaves the disk's content in `after`."""
    how = "chmod" if kind == "denied" else "mount" if can_mount() else "inject"
    spec = json.dumps(dict(disk=str(disk), kind=kind, how=how, src=str(src), after=str(after), argvs=argvs))
    command = [sys.executable, "-c", UNWRITABLE, spec]
    if how == "mount":
        command = [*UNSHARE, *command]
    elif how == "chmod" and os.geteuid() == 0:
        command = [sys.executable, "-c", WITHOUT_ROOTS_POWER, *command]
    disk.mkdir()
    run = subprocess.run(command, cwd=HERE, env=child_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


def contents(*folders):
    """relative path -> bytes of every file under `folders`, but the lock (which holds a process id)."""
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
            for folder in folders for root, _, names in os.walk(folder) for name in names if name != files.LOCK}


CELL = '[[1, "conv_3x3", 0, "max_pool_3x3"]]'


def train_args(out, iters=6):
    """--train of an inline cell with tiny settings, on the CPU."""
    return ["--train", CELL, "--out", str(out), "--train-iters", str(iters), "--device", "cpu", *TRAIN]


@pytest.fixture(scope="module")
def whole_training(tmp_path_factory):
    """An uninterrupted --train of 6 iterations, on one thread like the commands the tests start."""
    out = tmp_path_factory.mktemp("whole") / "run"
    with one_thread():
        assert autometa.main(train_args(out)) == 0
    return out


@pytest.fixture(scope="module")
def half_training(tmp_path_factory):
    """The same --train stopped after its first checkpoint, at iteration 3 of 6."""
    out = tmp_path_factory.mktemp("half") / "run"
    with one_thread():
        assert autometa.main(train_args(out, iters=3)) == 0
    return out


def assert_same_training(out, whole):
    """`out` holds what the uninterrupted run left in `whole`: the same weights, history and log rows."""
    for name in ("last.pt", "best.pt"):
        a, b = (torch.load(os.path.join(folder, name), weights_only=True) for folder in (out, whole))
        assert (a["iteration"], a["history"], a["best"]) == (b["iteration"], b["history"], b["best"]), name
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (name, key)
    rows = [[{k: v for k, v in r.items() if k != "seconds"} for r in read_lines(os.path.join(folder, "train.jsonl"))]
            for folder in (out, whole)]
    assert rows[0] == rows[1]


@pytest.mark.slow
def test_train_resumes_a_folder_given_the_same_network_in_another_spelling_and_refuses_another_network(
        tmp_path, half_training, whole_training, capsys):
    # train_args writes CELL with its block's two inputs in the non-canonical order; the checkpoint keeps the
    # canonical spelling, and a resume compares networks, not spellings.
    assert json.loads(torch.load(half_training / "last.pt", weights_only=True)["arch"]) == [
        [0, "max_pool_3x3", 1, "conv_3x3"]]
    out = tmp_path / "run"
    shutil.copytree(half_training, out)
    kept = contents(out)
    other = ["--train", '[[0, "conv_3x3", 1, "max_pool_3x3"]]', *train_args(out)[2:]]  # another network
    assert autometa.main(other) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"autometa: error: {out} holds training of another architecture") and err.endswith(
        "pass a new --out to start fresh") and len(err.splitlines()) == 1
    assert contents(out) == kept
    swapped = ["--train", '[[0, "max_pool_3x3", 1, "conv_3x3"]]', *train_args(out)[2:]]  # the same network
    with one_thread():
        assert autometa.main(swapped) == 0
    assert "resuming from" in capsys.readouterr().out
    assert_same_training(out, whole_training)


@pytest.mark.parametrize("kind, words", [("denied", "permission denied"), ("read-only", "the file system is read-only"),
                                         ("full", "no space left on the device")])
@pytest.mark.slow
def test_unwritable_out_or_cache_dir_exits_2_and_keeps_what_is_there(tmp_path, half_training, whole_training,
                                                                       kind, words):
    src, disk = tmp_path / "src", tmp_path / "disk"
    shutil.copytree(half_training, src / "run")
    (src / "cache").mkdir()
    (src / "cache" / "old.npz").write_bytes(b"a cache of another image size")
    mini = make_csv_folder(tmp_path / "mini", np.random.default_rng(0))
    commands = {"run": train_args(disk / "run"), "new": train_args(disk / "new"),  # resumed, and new
                "cache": ["--inspect", "--data", str(mini), "--cache-dir", str(disk / "cache"), "--image-size", "64"]}
    results = run_unwritable(kind, disk, src, tmp_path / "after", list(commands.values()))
    for folder, result in zip(commands, results):
        assert result["status"] == 2 and len(result["err"].strip().splitlines()) == 1, result["err"]
        assert f"cannot write {disk / folder}" in result["err"] and words in result["err"], result["err"]
    kept = contents(tmp_path / "after" / "run", tmp_path / "after" / "cache")
    for name, content in contents(src / "run", src / "cache").items():  # unchanged, or a log with rows added
        assert kept[name] == content or (name.endswith(".jsonl") and kept[name].startswith(content)), name
    with one_thread():  # the disk writable again, the same command goes on from what was kept
        assert autometa.main(train_args(tmp_path / "after" / "run")) == 0
    assert_same_training(tmp_path / "after" / "run", whole_training)


def fake_scorer(cfg, splits, device, keep=None):
    """scoring.make_scorer's stand-in where only a search's wiring is tested: fake_accuracy, no training."""
    return lambda cell, trial=0, fresh=False, **options: dict(accuracy=fake_accuracy(cell), ci95=0.01,
                                                              params=scoring.parameters(cfg, cell))


@pytest.mark.slow
def test_a_full_disk_during_a_search_exits_2_and_the_same_command_goes_on(tmp_path, monkeypatch, capsys):
    # The log's write names no file, as on a real full disk. Only the wiring is tested: cells are scored by
    # fake_accuracy, not trained, and the predictor is a cheap one.
    monkeypatch.setattr(data, "splits_for", lambda cfg, needed: None)
    monkeypatch.setattr(scoring, "make_scorer", fake_scorer)
    predictor = pnas.Predictor
    monkeypatch.setattr(pnas, "Predictor", lambda ops, seed: predictor(ops, members=1, epochs=20))
    append = pnas.SearchLog.append

    def append_until_full(log, record):
        if len(log.records) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return append(log, record)
    monkeypatch.setattr(pnas.SearchLog, "append", append_until_full)
    out = tmp_path / "run"
    assert autometa.main(["--search", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out}: no space left on the device" in err and len(err.strip().splitlines()) == 1
    kept = read_lines(out / "search.jsonl")
    assert len(kept) == 2
    monkeypatch.setattr(pnas.SearchLog, "append", append)
    assert autometa.main(["--search", "--out", str(out), *TINY]) == 0
    log = read_lines(out / "search.jsonl")
    rescores = [r["role"] for r in log].count("rescore")  # the top 2, and conv4 unless among them
    assert log[:2] == kept and rescores in (2, 3) and len(log) == 3 + 1 + 3 + 1 + rescores


STOP_AT = r'''
"""--train that stops itself (SIGSTOP) at a chosen point, for the test to SIGKILL it there: after row
`at` of train.jsonl (point "row"), or halfway through writing the file `point` for the `at`-th time."""
import io, os, signal, sys
import autometa, files, training

point, at = sys.argv[1], int(sys.argv[2])
on_step, atomic_write, written = training.Trainer.on_step, files.atomic_write, []


def stop():
    os.kill(os.getpid(), signal.SIGSTOP)


def on_step_then_stop(trainer, i, loss, accuracy):
    on_step(trainer, i, loss, accuracy)
    if point == "row" and trainer.iteration == at:
        stop()


def stop_halfway(path, write):
    written.append(os.path.basename(path))
    if written[-1] != point or written.count(point) != at:
        return atomic_write(path, write)

    def half(f):
        whole = io.BytesIO()
        write(whole)
        f.write(whole.getvalue()[:len(whole.getvalue()) // 2])
        f.flush()
        stop()
    atomic_write(path, half)


training.Trainer.on_step, files.atomic_write = on_step_then_stop, stop_halfway
sys.exit(autometa.main(sys.argv[3:]))
'''


@pytest.mark.parametrize("point, at, last", [("row", 2, None), ("row", 4, 3), ("best.pt", 1, None), ("last.pt", 2, 3)],
                         ids=["before-any-checkpoint", "between-checkpoints", "mid-first-checkpoint",
                              "mid-last-checkpoint"])
@pytest.mark.slow
def test_train_killed_anywhere_holds_its_folder_till_then_and_resumes_to_the_same_weights(
        tmp_path, capsys, whole_training, point, at, last):
    out = tmp_path / "run"
    with open(tmp_path / "stderr", "w") as stderr:
        child = subprocess.Popen([sys.executable, "-c", STOP_AT, point, str(at), *train_args(out)], cwd=HERE,
                                 env=child_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        _, status = os.waitpid(child.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), (tmp_path / "stderr").read_text()
        # where it stopped: last.pt of iteration `last` (or none yet), and a half-written file mid-checkpoint
        checkpoint = torch.load(out / "last.pt", weights_only=True) if (out / "last.pt").exists() else {}
        assert checkpoint.get("iteration") == last
        assert any(name.endswith(files.PARTIAL) for name in os.listdir(out)) == (point != "row")
        for other in (["--search", "--out", str(out)], train_args(out)):  # no second run on a live run's folder
            assert autometa.main(other) == 2
            err = capsys.readouterr().err
            assert f"{out} is in use by another run (process {child.pid})" in err and len(err.splitlines()) == 1
    finally:
        child.kill()
        child.wait()
    with one_thread():  # the same command, with no clean-up in between
        assert autometa.main(train_args(out)) == 0
    assert_same_training(out, whole_training)
    assert not [name for name in os.listdir(out) if name.endswith(files.PARTIAL)]


@pytest.mark.slow
def test_train_and_draw_read_every_form_of_an_architecture(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where --train's default --out, runs/train-NAME, goes
    (tmp_path / "mine.json").write_text(json.dumps([[0, "identity", 1, "conv_3x3"]]))
    (tmp_path / "best.json").write_text(json.dumps({"cell": [[1, "avg_pool_3x3", 1, "conv_3x3"]], "accuracy": 0.5}))
    forms = {"autometa": "train-autometa", "mine.json": "train-mine", "best.json": "train-best",
             '[[1, "conv_3x3", 0, "identity"]]': "train-cell"}
    for arch, out in forms.items():
        with one_thread():
            assert autometa.main(["--train", arch, "--train-iters", "1", "--val-every", "1", *TRAIN]) == 0
        state = torch.load(tmp_path / "runs" / out / "last.pt", weights_only=True)
        assert cells.load_arch(state["arch"]) == pnas.canonical(cells.load_arch(arch))  # its one spelling
        for _ in range(2):  # drawn anew over an older picture
            assert autometa.main(["--draw", arch, "--out", f"{out}.png"]) == 0
        assert_picture(tmp_path / f"{out}.png")
    capsys.readouterr()
    unknown = '[[1, "conv_3x3", 0, "conv_9x9"]]'
    for args in (["--train", unknown], ["--draw", unknown, "--out", "unknown.png"]):
        assert autometa.main(args) == 2
        err = capsys.readouterr().err
        assert "unknown op 'conv_9x9'" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path / "runs")) == sorted(forms.values())


def test_eval_of_an_architecture_or_a_folder_says_what_to_pass(tmp_path, capsys):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"cell": [[1, "conv_3x3", 0, "identity"]], "accuracy": 0.5}))
    for path, words in [(str(best), f"--train {best}, then pass --eval {os.path.join('runs', 'train-best', 'best.pt')}"),
                        ("conv4", "meta-train it first with --train conv4"),
                        ('[[1, "conv_3x3", 0, "identity"]]', os.path.join("runs", "train-cell", "best.pt")),
                        (str(tmp_path), "is a folder, not a checkpoint")]:
        assert autometa.main(["--eval", path]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------- report.py

REPORT_CONFIG = {"ways": 5, "shots": 1, "blocks": 3, "data": "synthetic", "image_size": 28, "meta_iters": 60,
                 "eval_episodes": 50}


def random_cell(rng, blocks):
    """A random valid cell of `blocks` blocks."""
    ops = list(cells.OPS)
    cell = []
    for b in range(blocks):
        op1 = rng.choice(ops)
        cell.append([rng.randrange(b + 2), op1, rng.randrange(b + 2), rng.choice([op for op in ops if op != op1 or op != "none"])])
    return cell


def fake_log(levels=3):
    """search.jsonl records: level 2's predictions rank its cells right (rho +1), level 3's exactly wrong (rho -1)."""
    rng, records = random.Random(0), []
    for b, accuracies in [(1, [0.31, 0.45, 0.38, 0.52, 0.29, 0.41]), (2, [0.50, 0.58, 0.55, None]),
                          (3, [0.61, 0.57, 0.66])][:levels]:
        for k, accuracy in enumerate(accuracies):
            predicted = None if b == 1 else accuracy if b == 2 else 1 - accuracy
            records.append(dict(level=b, cell=pnas.canonical(random_cell(rng, b)), blocks=b, role="first" if b == 1 else "beam",
                                accuracy=accuracy,
                                ci95=None if accuracy is None else 0.04, params=1000 * b + k, seconds=30.0,
                                predicted=None if predicted is None else round(predicted, 4),
                                status="ok" if accuracy is not None else "diverged"))
    return records


def assert_picture(path, size=None):
    """The PNG exists, has the expected size, and is not blank: many colours, a fair share of non-white pixels."""
    image = Image.open(path).convert("RGB")
    if size is not None:
        assert image.size == size
    pixels = np.asarray(image)
    assert (pixels.min(axis=2) < 200).mean() > 0.01
    assert len(image.getcolors(1 << 20)) > 20


def regions(image, colors, least=100):
    """Colour -> how many 4-connected regions of at least `least` pixels of exactly that colour the picture has."""
    rgb = np.asarray(image.convert("RGB")).astype(np.int32)
    packed = rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]
    return {color: regions_of(packed == (color[0] << 16 | color[1] << 8 | color[2]), least) for color in colors}


def regions_of(mask, least):
    """How many 4-connected regions of at least `least` pixels `mask` has, from its runs on each row, joined
    where runs of consecutive rows overlap."""
    steps = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    runs = [(y, a, b) for (y, a), (_, b) in zip(np.argwhere(steps == 1).tolist(), np.argwhere(steps == -1).tolist())]
    parent, size = list(range(len(runs))), [b - a for _, a, b in runs]  # union-find over the runs (columns a..b-1)

    def root(k):
        while parent[k] != k:
            k = parent[k]
        return k
    first = 0  # the first run of the row above the current one
    for k, (y, a, b) in enumerate(runs):
        while runs[first][0] < y - 1:
            first += 1
        for j in range(first, k):
            if runs[j][0] == y - 1 and runs[j][1] < b and a < runs[j][2]:  # touching runs of consecutive rows
                i, m = root(j), root(k)
                if i != m:
                    parent[m], size[i] = i, size[i] + size[m]
    # anti-aliased text may hit a box's colour on a few pixels
    return sum(parent[k] == k and size[k] >= least for k in range(len(runs)))


def op_boxes(cell):
    """Fill colour -> how many op boxes of that colour the cell's picture should have: one per op that is not none."""
    counts = {}
    for block in cell:
        for op in block[1::2]:
            if op != "none":
                counts[drawing.OP_FILL[op]] = counts.get(drawing.OP_FILL[op], 0) + 1
    return counts


def red_rows(path, box=(95, 130, 640, 470)):
    """The rows of the panel `box` of report.png with pixels of drawing.RED, and how many red dashes the row with most has."""
    left, top, right, bottom = box
    red = np.all(np.asarray(Image.open(path).convert("RGB"))[top + 1:bottom, left:right + 1] == drawing.RED, axis=2)
    rows = sorted(top + 1 + y for y in set(np.nonzero(red)[0].tolist()))
    dashes = max((int((np.diff(row.astype(int)) == 1).sum()) for row in red), default=0)  # white-to-red steps
    return rows, dashes


def test_write_report_writes_pictures_and_a_markdown_summary(tmp_path):
    conv4 = dict(level=1, cell=[list(b) for b in cells.CONV4_CELL], blocks=1, role="baseline", accuracy=0.45,
                 ci95=0.04, params=900, seconds=30.0, predicted=None, status="ok")
    records = [conv4] + fake_log()  # conv4 scored first, as a search does
    report.write_report(str(tmp_path), records, REPORT_CONFIG)
    assert_picture(tmp_path / "report.png", report.SEARCH_SIZE)
    # conv4's dashed red line at its score, by hand: scores 0.29-0.66 with CIs of 0.04 and chance 0.2 span
    # 25-70%, widened by 3% and rounded to ticks of 10: the axis runs 10-80% over pixel rows 470 (bottom) to 130,
    # so 45% lies at row 470 - (45 - 10) / 70 * 340 = 300, and a 2-pixel line covers rows 300-301.
    rows, dashes = red_rows(tmp_path / "report.png")
    assert rows == [300, 301] and dashes > 20  # a dash of 8 pixels every 16 across the 545-pixel panel
    report.draw_search(fake_log(), tmp_path / "no_conv4.png", chance=0.2)
    assert red_rows(tmp_path / "no_conv4.png") == ([], 0)
    # best_cell.png: the best cell by hand (66%, the last of level 3) drawn with its title, pixel for pixel
    best = records[-1]
    drawing.draw_cell(best["cell"], tmp_path / "direct.png", "best cell: 66.00% ± 4.00% (level 3, 3,002 parameters)")
    picture = Image.open(tmp_path / "best_cell.png").convert("RGB")
    assert np.array_equal(np.asarray(picture), np.asarray(Image.open(tmp_path / "direct.png").convert("RGB")))
    # and it shows that cell's ops, by hand from its blocks [max_pool, identity], [max_pool, avg_pool],
    # [conv_1x5_5x1, none]: 3 pool boxes, 1 identity box, 1 convolution box (a none half has none)
    assert regions(picture, set(drawing.OP_FILL.values())) == {
        drawing.OP_FILL["max_pool_3x3"]: 3, drawing.OP_FILL["identity"]: 1, drawing.OP_FILL["conv_1x5_5x1"]: 1,
        drawing.OP_FILL["sep_conv_3x3"]: 0}
    md = (tmp_path / "report.md").read_text()
    assert "![" in md and "(report.png)" in md and "(best_cell.png)" in md
    rank1 = next(line for line in md.split("## Best cells")[1].split("\n") if line.startswith("| 1 |"))
    assert json.dumps(best["cell"]) in rank1
    assert "66.00% ± 4.00%" in md and "3,002" in md
    assert "| 2 | 4 | 3 |" in md  # level 2: 4 scored, 3 ok
    assert "+1.000" in md and "-1.000" in md  # Spearman of level 2 and level 3
    assert "Levels finished: 3 of 3" in md and '"meta_iters": 60' in md


def test_search_picture_after_the_first_level_and_with_every_cell_failed(tmp_path):
    report.draw_search(fake_log(levels=1), tmp_path / "one.png", chance=0.2)
    assert_picture(tmp_path / "one.png", report.SEARCH_SIZE)
    failed = [dict(r, accuracy=None, ci95=None, status="failed") for r in fake_log(levels=1)]
    report.write_report(str(tmp_path), failed, REPORT_CONFIG)
    assert (tmp_path / "report.png").exists() and not (tmp_path / "best_cell.png").exists()


def test_report_says_which_levels_spread_less_than_the_seed_noise(tmp_path):
    records = list({pnas.cell_key(r["cell"]): r for r in fake_log()}.values())  # one record per network
    alone = records[0]
    quiet = dict(alone, role="noise", trial=1, accuracy=alone["accuracy"] + 0.01)
    report.write_report(str(tmp_path), records + [quiet], REPORT_CONFIG)  # noise 0.7 points: under every spread
    assert "spread less than the seed noise" not in (tmp_path / "report.md").read_text()
    loud = dict(quiet, accuracy=alone["accuracy"] + 0.0707)  # noise 5 points: over levels 2 and 3 (3.3, 3.7)
    report.write_report(str(tmp_path), records + [loud], REPORT_CONFIG)
    assert "At levels 2, 3 the cells' scores spread less than the seed noise" in (tmp_path / "report.md").read_text()


def test_draw_training_on_made_up_history(tmp_path):
    history = [dict(iteration=i, loss=1.6 / (1 + i / 100), train_accuracy=min(1.0, 0.2 + i / 1500), seconds=i / 10)
               for i in range(10, 1001, 10)]
    for row in history[9::10]:
        row["val_accuracy"] = 0.15 + row["iteration"] / 2500
    history[5]["val_accuracy"] = None
    report.draw_training(history, tmp_path / "train.png", chance=0.2)
    assert_picture(tmp_path / "train.png", report.TRAINING_SIZE)
    report.draw_training([dict(iteration=0, loss=1.61, train_accuracy=0.2)], tmp_path / "one.png")
    assert_picture(tmp_path / "one.png", report.TRAINING_SIZE)


def test_draw_cell_builtins_and_random_cells_put_every_box_in_its_own_place(tmp_path):
    rng = random.Random(1)
    drawn = [list(cell) for cell in cells.BUILTIN.values()] + [[[1, "none", 0, "conv_3x3"], [2, "identity", 0, "none"]]]
    drawn += [random_cell(rng, blocks) for blocks in range(1, 6) for _ in range(3)]
    for k, cell in enumerate(drawn):
        path = tmp_path / f"cell{k}.png"
        drawing.draw_cell(cell, path)
        assert_picture(path)
        image, layout = Image.open(path).convert("RGB"), drawing.CellLayout([tuple(b) for b in cell])
        assert image.height == int(layout.height) and image.width >= layout.width - 1
        for column in layout.columns:  # items of a column never overlap, and all lie inside the picture
            spans = sorted((layout.top[i], layout.top[i] + layout.size[layout.kind(i)][1]) for i in column)
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
            assert spans[0][0] > 0 and spans[-1][1] < image.height
        for node, halves in layout.halves.items():  # each op box is drawn, in its op's colour, where planned
            x, top = layout.lefts[layout.depth[node]], layout.top[("node", node)]
            assert len(halves) == sum(op != "none" for op in cell[node - 2][1::2])  # no box for a none half
            for j, (_, op) in enumerate(halves):
                y = layout.box_top(node, j) + 4
                assert layout.box_top(node, 0) == top + drawing.CAPTION_H + (
                    0 if len(halves) == 2 else (drawing.BOX_H + drawing.BOX_GAP) / 2)  # one op: its box centred
                assert image.getpixel((int(x) + 4, int(y))) == drawing.OP_FILL[op]
        # one box per op that is not none, and no other: a 3-block cell's picture is not a 2-block one's
        assert regions(image, set(drawing.OP_FILL.values())) == {
            color: op_boxes(cell).get(color, 0) for color in set(drawing.OP_FILL.values())}


def test_draw_command_draws_builtins_inline_json_and_files_and_rejects_bad_cells(tmp_path, capsys):
    assert autometa.main(["--draw", "autometa", "--out", str(tmp_path / "a.png")]) == 0
    assert_picture(tmp_path / "a.png")
    assert autometa.main(["--draw", '[[1, "conv_3x3", 0, "identity"]]', "--out", str(tmp_path / "b.png")]) == 0
    (tmp_path / "best.json").write_text(json.dumps({"cell": [[0, "identity", 1, "avg_pool_3x3"]], "accuracy": 0.5}))
    assert autometa.main(["--draw", str(tmp_path / "best.json"), "--out", str(tmp_path / "c.png")]) == 0
    capsys.readouterr()
    assert autometa.main(["--draw", "conv4", "--out", str(tmp_path / "e.png")]) == 0
    capsys.readouterr()
    for args in (["--draw", '[[1, "none", 0, "none"]]', "--out", str(tmp_path / "d.png")],
                 ["--draw", '[[1, "conv_3x3", 0]]', "--out", str(tmp_path / "d.png")],
                 ["--draw", '[[1, "conv_3x3"', "--out", str(tmp_path / "d.png")],
                 ["--draw", '[[2, "conv_3x3", 0, "identity"]]', "--out", str(tmp_path / "d.png")],
                 ["--draw", "autometa"], ["--draw", "autometa", "--out", str(tmp_path / "d.jpg")]):
        assert autometa.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("autometa: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d.png").exists()


@pytest.mark.slow
def test_search_writes_its_report_after_every_level(tmp_path, monkeypatch):
    # Only the wiring is tested here: cells are scored by fake_accuracy, not trained (the end-to-end test trains).
    monkeypatch.setattr(data, "splits_for", lambda cfg, needed: None)
    monkeypatch.setattr(scoring, "make_scorer", fake_scorer)
    out, levels, write = str(tmp_path / "run"), [], report.write_report

    def counting_write(out, records, config):
        levels.append(max(r["level"] for r in records))
        write(out, records, config)
    monkeypatch.setattr(report, "write_report", counting_write)
    assert autometa.main(["--search", "--out", out, *TINY]) == 0
    assert levels[:2] == [1, 2]
    for name in ("report.png", "best_cell.png"):
        assert_picture(os.path.join(out, name))
    md = open(os.path.join(out, "report.md")).read()
    best = json.load(open(os.path.join(out, "best.json")))
    assert json.dumps(best["cell"]) in md and "Levels finished: 2 of 2" in md


# ---------------------------------------------------------------------------- distributed search

def torchrun(*args, timeout=120):
    """Run a torchrun job of 2 processes on this machine, as a user would."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args],
                          cwd=HERE, env=child_env(), capture_output=True, text=True, timeout=timeout)


def torchrun_fake(out, **kw):
    """A fake search under torchrun: every process runs fake_rank(out, **kw)."""
    code = f"import test_autometa as t; t.fake_rank({str(out)!r}, **{kw!r})"
    return torchrun("--no-python", sys.executable, "-c", code)


def cheap_predictor():
    """A predictor that fits in a blink: these tests check who scores what, not how well it ranks."""
    return pnas.Predictor(list(cells.OPS), members=1, epochs=20)


def fake_rank(out, seconds=0.02, slow=1, crash_after=0, stall_after=0, minutes=1.0):
    """One process of a fake search under torchrun. Its score names the rank that computed it (`params`);
    rank 1 is `slow` times slower, and dies or hangs on its `crash_after`-th or `stall_after`-th cell."""
    team = Team.join(minutes)
    scored = 0

    def score(cell):
        nonlocal scored
        scored += 1
        if team.rank == 1 and scored == crash_after:
            os._exit(3)  # like a process killed by the system: no exception, no clean-up
        if team.rank == 1 and scored == stall_after:
            time.sleep(600)
        time.sleep(seconds * (slow if team.rank == 1 else 1))
        return {"accuracy": fake_accuracy(cell), "ci95": 0.01, "params": team.rank}

    if team.rank == 0:
        run_fake_search(out, score=score, job=team, predictor=cheap_predictor())
        team.dismiss()
    else:
        team.serve(score)


def results(path, ignore=("seconds", "params")):
    """The log as a set of records, without the clock (and the fake scorer's rank, in `params`)."""
    return {json.dumps({k: v for k, v in r.items() if k not in ignore}, sort_keys=True) for r in read_lines(path)}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    run_fake_search(out, predictor=cheap_predictor())
    return out


@pytest.mark.slow
def test_two_ranks_log_what_one_process_logs_and_a_faster_rank_takes_more(tmp_path, one_process):
    result = torchrun_fake(tmp_path, slow=4)
    assert result.returncode == 0, result.stderr
    log = read_lines(tmp_path / "search.jsonl")
    assert len(log) == 16 and results(tmp_path / "search.jsonl") == results(one_process / "search.jsonl")
    assert (tmp_path / "best.json").read_text() == (one_process / "best.json").read_text()
    by_rank0 = sum(r["params"] == 0 for r in log)
    assert 16 > by_rank0 > 16 / 2  # both worked, and the rank 4 times faster scored more than its half


@pytest.mark.slow
def test_a_crashed_rank_fails_the_job_and_a_rerun_resumes_from_the_log(tmp_path, one_process):
    started = time.time()
    crashed = torchrun_fake(tmp_path, crash_after=3)
    assert crashed.returncode != 0 and time.time() - started < 60  # torchrun stopped rank 0, no wait ran out
    assert "exitcode  : 3" in crashed.stderr and "rank      : 1" in crashed.stderr
    kept = read_lines(tmp_path / "search.jsonl")  # every line complete: read_lines parses each
    assert 2 <= len(kept) < 16
    resumed = torchrun_fake(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    log = read_lines(tmp_path / "search.jsonl")
    assert log[:len(kept)] == kept and len(log) == 16  # nothing scored twice
    assert results(tmp_path / "search.jsonl") == results(one_process / "search.jsonl")


@pytest.mark.slow
def test_a_hung_rank_fails_the_job_after_wait_minutes_with_a_clear_message(tmp_path):
    hung = torchrun_fake(tmp_path, stall_after=2, minutes=0.05)
    assert hung.returncode != 0
    assert "no result reached rank 0 for 0.05 min" in hung.stderr and "rerun the same command" in hung.stderr
    assert len(read_lines(tmp_path / "search.jsonl")) >= 1


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    """The tiny search in one process, one candidate at a time (its OUT folder)."""
    out = tmp_path_factory.mktemp("one") / "run"
    alone = cli("--search", "--out", str(out), *TINY, "--workers", "1")
    assert alone.returncode == 0, alone.stderr
    return out


def assert_same_search(out, reference):
    """The same log records (but the clock) and the same best cell and scores as the search in `reference`."""
    one, two = (results(run / "search.jsonl", ignore=["seconds"]) for run in (reference, out))
    assert two == one and len(one) == len(read_lines(reference / "search.jsonl"))  # no row twice
    best = [json.loads((run / "best.json").read_text()) for run in (reference, out)]
    assert [{k: b[k] for k in ("cell", "accuracy", "ci95", "rescore")} for b in best] == [
        {k: best[0][k] for k in ("cell", "accuracy", "ci95", "rescore")}] * 2


@pytest.mark.slow
def test_tiny_search_under_torchrun_matches_one_process(tmp_path, one_worker):
    # Scores on a CPU depend on the thread count: a search fixes it (--threads, 1), whatever OMP_NUM_THREADS says.
    with files.hold(str(tmp_path / "two")):  # while another run (this process) holds --out, rank 0 refuses it
        refused = torchrun("autometa.py", "--search", "--out", str(tmp_path / "two"), *TINY, timeout=300)
    assert refused.returncode != 0 and f"in use by another run (process {os.getpid()})" in refused.stderr
    assert not (tmp_path / "two" / "search.jsonl").exists()
    shared = torchrun("autometa.py", "--search", "--out", str(tmp_path / "two"), *TINY, timeout=300)
    assert shared.returncode == 0, shared.stderr
    assert_same_search(tmp_path / "two", one_worker)
    assert "shared among 2 processes (torchrun)" in shared.stdout and shared.stdout.count("[level") == 4 + 3


@pytest.mark.slow
def test_tiny_search_with_two_workers_matches_one_worker(tmp_path, one_worker):
    shared = cli("--search", "--out", str(tmp_path / "two"), *TINY, "--workers", "2")
    assert shared.returncode == 0, shared.stderr
    assert_same_search(tmp_path / "two", one_worker)
    assert "shared among 2 processes (--workers)" in shared.stdout and shared.stdout.count("[level") == 4 + 3
    refused = torchrun("autometa.py", "--search", "--out", str(tmp_path / "three"), *TINY, "--workers", "2")
    assert refused.returncode != 0 and "--workers 2 under torchrun" in refused.stderr


def test_a_worker_that_stops_ends_the_search_at_once_with_a_sentence(tmp_path):
    cfg = config.make_config({"out": str(tmp_path)})
    store = torch.distributed.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    workers = team.Workers(cfg, 2, store.port)
    workers.command = [sys.executable, "-c", "import sys; sys.exit(3)"]  # as a worker with bad input would
    started = time.time()
    with pytest.raises(pnas.SearchError, match="worker process 1 stopped with exit status 3.*rerun the same command"):
        Team(store, 0, 2, timedelta(minutes=5), workers).barrier()
    assert time.time() - started < 60


def test_config_flags_give_the_config_back_and_default_workers():
    for cfg in (config.make_config({}), config.make_config({"ops": "conv_3x3,identity", "cache_dir": ""}, "paper")):
        args = autometa.make_parser().parse_args(["--search", *config.config_flags(cfg)])
        assert config.make_config(autometa.flags(args)) == cfg
    cores = len(os.sched_getaffinity(0))
    cpu = torch.device("cpu")
    assert config.default_workers(config.Config(threads=1), cpu) == cores
    assert config.default_workers(config.Config(threads=2 * cores), cpu) == 1


def test_workers_share_gpus_round_robin(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    assert [team.rank_device(torch.device("cuda"), r).index for r in range(5)] == [0, 1, 0, 1, 0]
    assert team.rank_device(torch.device("cuda", 1), 0) == torch.device("cuda", 1)  # cuda:N: that GPU for all
    assert team.rank_device(torch.device("cpu"), 3) == torch.device("cpu")
    assert config.default_workers(config.Config(), torch.device("cuda")) == min(8, len(os.sched_getaffinity(0)))


# ---------------------------------------------------------------------------- CUDA errors (made up on a CPU)

def test_a_gpu_that_is_not_there_exits_2_with_a_sentence(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert config.pick_device("cuda:1") == torch.device("cuda", 1)
    assert autometa.main(["--search", "--device", "cuda:2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--device cuda:2 names GPU 2, but this machine has 2 (cuda:0 to cuda:1)" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_out_of_memory_fails_one_candidate_and_a_lost_gpu_stops_the_search(monkeypatch, tmp_path):
    cfg = config.Config(ways=3, shots=1, queries=2, channels=4, meta_iters=2, eval_episodes=3, meta_batch=1,
                        image_size=28, out=str(tmp_path))
    splits = data.synthetic_splits(28, 0)
    a, b = ((1, "conv_3x3", 0, "identity"),), ((0, "max_pool_3x3", 1, "avg_pool_3x3"),)
    expected = scoring.make_scorer(cfg, splits, torch.device("cpu"))(b)
    errors, lost, train = [], [], scoring.train_and_score

    def on_a_made_up_gpu(cfg, splits, device, cell, *args):  # trains on the CPU, fails when told to
        if errors:
            raise errors.pop()
        return train(cfg, splits, torch.device("cpu"), cell, *args)

    monkeypatch.setattr(scoring, "train_and_score", on_a_made_up_gpu)
    monkeypatch.setattr(scoring, "gpu_lost", lambda device: bool(lost))
    score = scoring.make_scorer(cfg, splits, torch.device("cuda"))
    errors.append(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    failed = pnas.score_safely(score, a)
    assert failed["status"] == "failed" and failed["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert score(b) == expected  # the next candidate is untouched
    errors.append(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert pnas.score_safely(score, a)["status"] == "failed"  # the GPU still works: one failed candidate
    errors.append(RuntimeError("CUDA error: an illegal memory access was encountered"))
    lost.append(True)
    with pytest.raises(pnas.SearchError, match="unusable in this process.*illegal memory access.*rerun the same"):
        pnas.score_safely(score, a)
    scored = []

    def stops_at_the_third(cell):
        if len(scored) == 2:
            raise pnas.SearchError("the GPU is lost")
        scored.append(cell)
        return {"accuracy": fake_accuracy(cell), "ci95": 0.01, "params": 1}

    with pytest.raises(pnas.SearchError, match="the GPU is lost"):
        run_fake_search(tmp_path / "search", score=stops_at_the_third)
    assert len(read_lines(tmp_path / "search" / "search.jsonl")) == 2
    store = torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    scored.clear()
    with pytest.raises(pnas.SearchError, match="the GPU is lost"):  # rank 0's scoring thread tells its main thread
        list(Team(store, 0, 1, timedelta(minutes=1)).score_all(stops_at_the_third, [a, b, a, b]))


# ---------------------------------------------------------------------------- fastcpu.py

import fastcpu  # noqa: E402  (here, so that this section stays self-contained)

class ViewNet(nn.Module):
    """A conv net that flattens with .view(), which a channels-last activation cannot do."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Linear(16 * 8 * 8, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.view(x.shape[0], -1))


class RunningStatsDropoutNet(nn.Module):
    """BatchNorm with running statistics and dropout: buffers and the RNG must end as the plain loop leaves them."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.drop, self.fc = nn.Dropout(0.3), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3))))


def image_tasks(size, ways=3, tasks=2, queries=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(ways).expand(tasks, -1)
    return (torch.rand(tasks, ways, 3, size, size, generator=g, dtype=dtype), y,
            torch.rand(tasks, ways * queries, 3, size, size, generator=g, dtype=dtype),
            torch.arange(ways).repeat_interleave(queries).expand(tasks, -1))


def reference_meta_loss(model, params, tasks, steps, lr, first_order=False):
    """MAML as learn2learn and higher run it: one task at a time, autograd.grad(create_graph=True)."""
    xs, ys, xq, yq = tasks
    losses = []
    for t in range(xs.shape[0]):
        fast = params
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, fast, (xs[t],)), ys[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {name: p - lr * g for (name, p), g in zip(fast.items(), grads)}
        losses.append(F.cross_entropy(functional_call(model, fast, (xq[t],)), yq[t]))
    return torch.stack(losses).mean(), None


def fast_meta_loss(model, params, tasks, steps, lr, first_order=False):
    """maml.meta_loss with fastcpu's speed-ups switched on."""
    with fastcpu.speedups(model, first_order) as layout:
        return maml.meta_loss(model, params, layout(tasks), steps, lr, first_order)


def fast_and_reference(model, tasks, first_order, steps=2, lr=0.1):
    """(loss, meta-gradient) of maml.meta_loss with fastcpu and of the reference per-task loop at the same weights."""
    out = []
    for loss_fn in (fast_meta_loss, reference_meta_loss):
        params = dict(model.named_parameters())
        loss, _ = loss_fn(model, params, tasks, steps, lr, first_order)
        out.append((loss, torch.autograd.grad(loss, list(params.values()))))
    return out


def assert_same(model, tasks, first_order, atol):
    (loss, grads), (ref_loss, ref_grads) = fast_and_reference(model, tasks, first_order)
    assert abs(loss.item() - ref_loss.item()) < atol
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=0, atol=atol), (a - b).abs().max().item()


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("arch", [cells.CONV4_CELL, cells.AUTOMETA_CELL], ids=["conv4", "autometa"])
def test_fast_meta_loss_equals_the_per_task_loop(arch, first_order):
    torch.manual_seed(0)
    model = cells.build_network(arch, 3, 16, channels=16, reductions=1).double()
    tasks = image_tasks(16, dtype=torch.float64)
    with fastcpu.speedups(model, first_order) as layout:
        assert not layout(tasks)[2][0].is_contiguous()  # fast path taken
    assert_same(model, tasks, first_order, atol=1e-10)


def test_fast_meta_loss_is_as_accurate_as_the_per_task_loop_in_float32():
    torch.manual_seed(0)
    model, tasks = cells.build_network(cells.CONV4_CELL, 3, 16), image_tasks(16)
    exact = cells.build_network(cells.CONV4_CELL, 3, 16).double()
    exact.load_state_dict(model.state_dict())
    _, truth = fast_and_reference(exact, tuple(t.double() if t.is_floating_point() else t for t in tasks), False)[1]
    (_, ours), (_, loop) = fast_and_reference(model, tasks, first_order=False)
    # Gradients reach 0.9 here; the loop's own float32 error is 1.4e-5 against float64, ours 3.2e-6.
    for grads in (ours, loop):
        assert max((g.double() - t).abs().max().item() for g, t in zip(grads, truth)) < 3e-5


def test_models_the_fast_layout_does_not_suit_run_as_written():
    torch.manual_seed(0)
    tasks = image_tasks(16)
    small_1x1 = cells.build_network(cells.AUTOMETA_CELL, 3, 16, channels=4, reductions=1)  # oneDNN bug guard
    for model in (ViewNet(), small_1x1):
        with fastcpu.speedups(model, first_order=False) as layout:
            assert layout(tasks)[2][0].is_contiguous()
        assert_same(model, tasks, first_order=False, atol=1e-5)  # float32 rounding of BatchNorm's double backward


def test_layout_check_leaves_running_statistics_and_the_random_stream_as_the_plain_loop_does():
    torch.manual_seed(0)
    ours, ref = RunningStatsDropoutNet(), RunningStatsDropoutNet()
    ref.load_state_dict(ours.state_dict())
    tasks = image_tasks(8)
    results = []
    for model, loss_fn in ((ours, fast_meta_loss), (ref, reference_meta_loss)):
        torch.manual_seed(1)
        results.append(loss_fn(model, dict(model.named_parameters()), tasks, 2, 0.1)[0].item())
    assert results[0] == pytest.approx(results[1], abs=1e-6)
    for a, b in zip(ours.buffers(), ref.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def loss_and_gradients(meta_loss, model, tasks, first_order):
    """meta_loss(model, its parameters, tasks, 2 inner steps, inner lr 0.1), its accuracy, and the loss's gradients."""
    params = dict(model.named_parameters())
    loss, accuracy = meta_loss(model, params, tasks, 2, 0.1, first_order)
    return loss, accuracy, torch.autograd.grad(loss, list(params.values()))


def double_backward(op, inputs, upstream, mode):
    """op(*inputs), its first gradients (weighted by `upstream`) w.r.t. the inputs that need them, and the
    gradients of a loss on those first gradients w.r.t. the same inputs and `upstream`."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    with mode() if mode else contextlib.nullcontext():
        out = op(*inputs)
    first = torch.autograd.grad(out, wanted, upstream, create_graph=True)
    loss = sum((torch.sin(torch.arange(g.numel(), dtype=g.dtype)).view_as(g) * g).sum() for g in first)
    loss = loss + (first[0] ** 2).sum() * 0.5  # a nonlinear use of a first gradient too
    second = torch.autograd.grad(loss, wanted + [upstream], materialize_grads=True)
    return out, first, second


def assert_same_double_backward(op, inputs, upstream):
    """PyTorch's forward and first gradients bit for bit, and its second gradients to 1e-12 (float64)."""
    out, first, second = double_backward(op, inputs, upstream, fastcpu.SecondOrderKernels)
    ref_out, ref_first, ref_second = double_backward(op, inputs, upstream, None)
    assert torch.equal(out, ref_out)  # PyTorch's own kernels: the same bits
    assert all(torch.equal(a, b) for a, b in zip(first, ref_first))
    for a, b in zip(second, ref_second):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), (a - b).abs().max().item()


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 7), (4, 3, 5, 6)])
def test_batchnorm_double_backward_equals_pytorchs(shape, affine):
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_()
    weight, bias = ((torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_() for _ in range(2)) if affine \
        else (None, None)
    upstream = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert_same_double_backward(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), (x, weight, bias),
                                upstream)


def test_batchnorm_double_backward_passes_gradcheck():
    torch.manual_seed(0)
    x, upstream = (torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.rand(2, dtype=torch.float64, requires_grad=True)

    def gradients(x, weight, upstream):
        with fastcpu.SecondOrderKernels():
            out = F.batch_norm(x, None, None, weight, None, training=True)
        return torch.autograd.grad(out, (x, weight), upstream, create_graph=True)

    assert torch.autograd.gradcheck(gradients, (x, weight, upstream))  # derivatives of the gradients by finite differences


def test_batchnorm_mode_leaves_other_uses_of_batchnorm_to_pytorch():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    bn = nn.BatchNorm2d(3)
    with fastcpu.SecondOrderKernels():
        trained = bn(x)
        bn.eval()
        evaluated = bn(x)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            F.batch_norm(torch.randn(1, 3), None, None, training=True)
    assert type(trained.grad_fn).__name__ == "BatchNormBackward"  # ours
    assert type(evaluated.grad_fn).__name__ == "NativeBatchNormBackward0"  # running statistics: PyTorch's
    reference = nn.BatchNorm2d(3)
    reference(x)
    assert torch.equal(bn.running_mean, reference.running_mean) and torch.equal(bn.running_var, reference.running_var)


@pytest.mark.parametrize("images", [False, True])  # x needs no gradient, as the images, or does
@pytest.mark.parametrize("geometry", [dict(padding=1), dict(stride=2, padding=(1, 0), dilation=(1, 2), groups=2),
                                      dict(stride=(2, 1), bias=False, channels_last=True), dict(frozen_weight=True)])
def test_convolution_double_backward_equals_pytorchs(geometry, images):
    torch.manual_seed(0)
    geometry = dict(geometry)
    groups, has_bias = geometry.get("groups", 1), geometry.pop("bias", True)
    frozen = geometry.pop("frozen_weight", False)  # then only the bias has first gradients (with or without x's)
    layout = torch.channels_last if geometry.pop("channels_last", False) else torch.contiguous_format
    x = torch.randn(3, 4, 9, 8, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_(images)
    weight = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64, requires_grad=not frozen)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True) if has_bias else None

    def conv(x, weight, bias):
        return F.conv2d(x, weight, bias, **geometry)

    upstream = torch.randn_like(conv(x, weight, bias)).requires_grad_()
    assert_same_double_backward(conv, (x, weight, bias), upstream)


def test_convolution_double_backward_passes_gradcheck():
    torch.manual_seed(0)
    x, weight, bias, upstream = (torch.randn(shape, dtype=torch.float64, requires_grad=True)
                                 for shape in ((2, 2, 5, 5), (3, 2, 3, 3), (3,), (2, 3, 3, 3)))

    def gradients(x, weight, bias, upstream):
        with fastcpu.SecondOrderKernels():
            out = F.conv2d(x, weight, bias, stride=2, padding=1)
        return torch.autograd.grad(out, (x, weight, bias), upstream, create_graph=True)

    assert torch.autograd.gradcheck(gradients, (x, weight, bias, upstream))


def test_convolution_mode_leaves_string_padding_and_unbatched_input_to_pytorch():
    weight = torch.randn(2, 3, 3, 3, requires_grad=True)
    with fastcpu.SecondOrderKernels():
        ours = F.conv2d(torch.randn(1, 3, 5, 5), weight, padding=1)
        same = F.conv2d(torch.randn(1, 3, 5, 5), weight, padding="same")
        unbatched = F.conv2d(torch.randn(3, 5, 5), weight)
    assert type(ours.grad_fn).__name__ == "ConvolutionBackward"
    assert type(same.grad_fn).__name__ == "ConvolutionBackward0"  # PyTorch's
    assert type(unbatched.grad_fn.next_functions[0][0]).__name__ == "ConvolutionBackward0"  # under a squeeze


# ---------------------------------------------------------------------------- batched.py and speedups.py

import batched  # noqa: E402
import speedups  # noqa: E402


def to_double(tasks):
    return tuple(t.double() if t.is_floating_point() else t for t in tasks)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("arch", [cells.CONV4_CELL, cells.AUTOMETA_CELL], ids=["conv4", "autometa"])
def test_batched_meta_loss_equals_the_per_task_loop_in_float64(arch, first_order):
    torch.manual_seed(0)
    model = cells.build_network(arch, 3, 16, channels=8, reductions=1).double()
    tasks = image_tasks(16, tasks=3, dtype=torch.float64)
    assert batched.runs(model, dict(model.named_parameters()), tasks)
    (loss, accuracy, grads), (ref_loss, ref_accuracy, ref_grads) = [
        loss_and_gradients(meta_loss, model, tasks, first_order) for meta_loss in (batched.meta_loss, maml.meta_loss)]
    assert abs(loss.item() - ref_loss.item()) < 1e-12 and accuracy == ref_accuracy
    assert max((g - r).abs().max().item() for g, r in zip(grads, ref_grads)) < 1e-10
    assert max(g.abs().max().item() for g in ref_grads) > 1e-3  # a real gradient, not zeros


def test_operations_are_counted_without_views_and_batching_runs_one_tasks_worth_for_a_whole_meta_batch():
    import bench
    a = torch.ones(2, 3)
    with bench.OperationCounter() as counter:
        (a + 1).view(6).mul(2).unsqueeze(0)  # add and mul compute; view and unsqueeze do not
    assert counter.count == 2
    torch.manual_seed(0)
    model = cells.build_network(cells.CONV4_CELL, 3, 16, channels=8)
    params = dict(model.named_parameters())

    def counts(tasks, first_order):
        return {name: bench.operations(meta_loss, model, params, image_tasks(16, tasks=tasks), 2, 0.1, first_order)
                for name, meta_loss in (("loop", maml.meta_loss), ("batched", batched.meta_loss))}

    second = {t: counts(t, first_order=False) for t in (1, 2, 4)}
    loop, together = ({t: second[t][name] for t in second} for name in ("loop", "batched"))
    assert loop[4] - loop[2] == 2 * (loop[2] - loop[1]) > 0  # the loop runs every task's operations again
    assert abs(together[4] - together[2]) < 0.01 * together[2]  # all tasks at once: about one task's operations
    assert together[4] < loop[4] / 3
    first = counts(2, first_order=True)  # batching's own operations (per-task weight gradients) outweigh a task's
    assert first["batched"] > first["loop"]


def trained_tiny_network(arch, seed=0):
    """The tiny search's network of `arch`, meta-trained briefly so that its predictions are not chance."""
    torch.manual_seed(seed)
    splits = data.synthetic_splits(28, 0)
    model = cells.build_network(arch, 5, 28, channels=4, reductions=2)  # small enough for batched evaluation
    sampler = data.EpisodeSampler(splits["train"], 5, 1, 5, seed)
    maml.meta_train(model, torch.optim.Adam(model.parameters(), 3e-3), lambda: sampler.sample(2), 10, 1, 0.1, True)
    return model, data.fixed_episodes(splits["val"], 5, 1, 5, 12, seed=0, batch=2)


@pytest.mark.slow
def test_batched_evaluation_gives_the_accuracies_of_one_episode_at_a_time():
    model, episodes = trained_tiny_network(cells.AUTOMETA_CELL[:2])
    params = dict(model.named_parameters())
    one_by_one = maml.episode_accuracies(model, params, episodes, 3, 0.1)
    assert len(set(one_by_one)) > 2  # episodes differ, so an order mix-up would show
    for group in (3, 4, 12):  # across task batches of 2, and all at once
        assert batched.episode_accuracies(model, params, episodes, 3, 0.1, group) == one_by_one
    exact = copy.deepcopy(model).double()
    double_episodes = [to_double(episodes[i]) for i in range(len(episodes))]
    assert (batched.episode_accuracies(exact, dict(exact.named_parameters()), double_episodes, 3, 0.1, 5)
            == maml.episode_accuracies(exact, dict(exact.named_parameters()), double_episodes, 3, 0.1))


def test_speedups_batch_evaluation_of_small_networks_on_a_cpu_and_fall_back_where_vmap_cannot_run():
    model, episodes = trained_tiny_network(cells.AUTOMETA_CELL[:1])
    assert speedups.automatic_group(model, episodes[0], cpu=True) == speedups.EVAL_BATCH
    assert speedups.automatic_group(model, episodes[0], cpu=False) == speedups.EVAL_BATCH
    assert speedups.automatic_group(cells.build_network(cells.CONV4_CELL, 5, 28), episodes[0], cpu=True) == 1
    params = dict(model.named_parameters())
    fast = speedups.choose(model, first_order=True)
    assert fast.per_episode(model, params, episodes, 3, 0.1) == maml.episode_accuracies(model, params, episodes, 3, 0.1)
    torch.manual_seed(0)
    ours, ref = RunningStatsDropoutNet(), RunningStatsDropoutNet()  # dropout and running statistics: no vmap
    ref.load_state_dict(ours.state_dict())
    tasks = image_tasks(8)
    assert not batched.runs(ours, dict(ours.named_parameters()), tasks)
    results = []
    for model, per_episode in ((ours, speedups.choose(ours, True, eval_batch=4).per_episode),
                               (ref, maml.episode_accuracies)):
        torch.manual_seed(1)
        results.append(per_episode(model, dict(model.named_parameters()), [tasks], 2, 0.1))
    assert results[0] == results[1]
    for a, b in zip(ours.buffers(), ref.buffers()):  # the vmap check left them as the loop does
        assert torch.equal(a, b)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("arch, channels_last", [(cells.CONV4_CELL, True), (cells.AUTOMETA_CELL[:3], True),
                                                 (cells.AUTOMETA_CELL, False)],  # its 1x1 projections: plain layout
                         ids=["conv4", "autometa-3-blocks", "autometa"])
def test_the_meta_loss_production_runs_has_maml_meta_loss_gradients(arch, channels_last, first_order):
    # Reference: maml.meta_loss on the task batch as sampled, against speedups.choose's layout and meta-loss
    # (what training.py, scoring.py and bench.py hand to maml.meta_train), in float64.
    torch.manual_seed(0)
    model = cells.build_network(arch, 3, 28, channels=4).double()
    tasks = image_tasks(28, tasks=2, dtype=torch.float64)
    fast = speedups.choose(model, first_order)
    batch = fast.layout(tasks)
    assert (not batch[2][0].is_contiguous()) == channels_last  # the layout production gets here
    (loss, accuracy, grads), (ref_loss, ref_accuracy, ref_grads) = [
        loss_and_gradients(meta_loss, model, given, first_order)
        for meta_loss, given in ((fast.meta_loss, batch), (maml.meta_loss, tasks))]
    assert abs(loss.item() - ref_loss.item()) < 1e-12 and accuracy == ref_accuracy
    assert max((g - r).abs().max().item() for g, r in zip(grads, ref_grads)) < 1e-12
    assert max(r.abs().max().item() for r in ref_grads) > 0.1  # a real gradient, not zeros


@pytest.mark.slow
def test_bench_runs_end_to_end_on_a_tiny_setting():
    result = cli("--bench", "--image-size", "16", "--queries", "1", "--meta-batch", "1", "--channels", "8",
                 "--reductions", "1", "--eval-episodes", "4", "--meta-iters", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for title in ("conv4, second order", "conv4, first order", "autometa cell, first order"):
        for allocator in ("default", "reused"):
            row = next(line for line in lines if line.startswith(title) and f" {allocator} " in line).split()
            ours, loop, ratio = float(row[-3].rstrip("s")), float(row[-2].rstrip("s")), float(row[-1].rstrip("x"))
            assert ours > 0 and loop > 0 and ratio > 0
        check = lines[lines.index(next(line for line in lines if line.startswith(title + ": peak"))) + 1]
        assert float(check.split(" in float64")[0].split()[-1]) < 1e-9  # the same meta-gradient, up to rounding
    assert any(line.startswith("episode sampler:") for line in lines)
    assert any(line.startswith("search candidate (autometa cell)") for line in lines)
    overhead = [line.split() for line in lines[lines.index(next(line for line in lines if line.startswith(
        "where arithmetic is next to nothing"))) + 2:][:8]]
    assert [(row[-7], int(row[-6])) for row in overhead] == [(order, tasks) for order in ("second", "first")
                                                           for tasks in (2, 4)] * 2
    assert all(int(row[-3]) < int(row[-5]) for row in overhead if row[-7] == "second" or row[-6] == "4")
    workers = config.default_workers(config.Config(threads=1), torch.device("cpu"))
    rates = [line for line in lines if "candidates/min" in line]
    assert rates[0].startswith("  1 worker: ") and len(rates) in ((2, 3) if workers > 1 else (1, 2))
    assert all(line.startswith("  1 worker on ") and "threads (the search before --workers)" in line
               for line in rates[1:len(rates) - (workers > 1)])  # where the process has more than 1 thread
    assert workers == 1 or rates[-1].startswith(f"  {workers} workers (the default here): ")


@pytest.mark.slow
def test_bench_of_one_workload_times_only_that_one():
    result = cli("--bench", "conv4", "--image-size", "16", "--queries", "1", "--meta-batch", "1", "--channels", "4")
    assert result.returncode == 0, result.stderr
    assert "conv4, second order" in result.stdout and "autometa cell" not in result.stdout
    assert "search candidate" not in result.stdout
    wrong = cli("--bench", "resnet")
    assert wrong.returncode == 2 and "invalid choice: 'resnet'" in wrong.stderr


PAGE_FAULTS = """
import resource, sys, torch, torch.nn as nn, fastcpu
if sys.argv[1] == "reuse":
    assert fastcpu.reuse_freed_memory()
net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
x = torch.randn(64, 3, 84, 84)  # activations of 55 MiB, which glibc always serves with a fresh mmap
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x).sum().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[1:]))  # the quietest pass after the first
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_reused_memory_stops_the_page_faults_of_each_forward_pass():
    faults = {}
    for setting in ("default", "reuse"):
        run = subprocess.run([sys.executable, "-c", PAGE_FAULTS, setting], cwd=HERE, env=child_env(),
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        faults[setting] = int(run.stdout)
    assert faults["default"] > 10000  # every pass faults in fresh pages (4 KiB each) for its activations
    assert faults["reuse"] < 1000  # a pass reuses the memory the one before freed


# ---------------------------------------------------------------------------- issue 34: claims that had no test

def fake_search_command(monkeypatch, make_scorer=fake_scorer):
    """autometa.main's --search as wired, but with no data, cells scored by `make_scorer`'s stand-in (no
    training) and a predictor that fits in a blink: for tests of what the command does around the scores."""
    monkeypatch.setattr(data, "splits_for", lambda cfg, needed: None)
    monkeypatch.setattr(scoring, "make_scorer", make_scorer)
    predictor = pnas.Predictor
    monkeypatch.setattr(pnas, "Predictor", lambda ops, seed: predictor(ops, members=1, epochs=20))


def one_error_sentence(err, status, expected):
    """The exit status is `expected`, and stderr is one line (no traceback)."""
    assert status == expected and "Traceback" not in err and len(err.strip().splitlines()) == 1, (status, err)
    return err.strip()


def test_report_columns_re_scored_and_probes_alone_and_each_levels_mean_against_hand_computed_figures(tmp_path):
    first = pnas.first_level(cells.OPS)[:5]
    second = pnas.expand(first[0], cells.OPS)[:5]

    def row(cell, accuracy, role, predicted=None, status="ok", trial=None):
        extra = {} if trial is None else {"trial": trial}
        return dict(level=len(cell), cell=cell, blocks=len(cell), role=role, status=status, accuracy=accuracy,
                    ci95=None if accuracy is None else 0.01, params=100, seconds=10.0, predicted=predicted, **extra)
    a, b = first, second
    records = ([row(a[k], x, "first") for k, x in enumerate([0.30, 0.40, 0.50, 0.36])]
               + [row(a[4], None, "first", status="failed"), row(a[0], 0.34, "noise", trial=1)]
               + [row(b[0], 0.55, "beam", 0.50), row(b[1], 0.52, "beam", 0.49)]
               + [row(b[2], 0.45, "probe", 0.40), row(b[3], 0.48, "probe", 0.42), row(b[4], 0.42, "probe", 0.44)]
               + [row(b[0], 0.50, "rescore", trial=1), row(b[0], 0.54, "rescore", trial=2),
                  row(b[0], None, "rescore", status="failed", trial=3),
                  row(b[1], 0.53, "rescore", trial=1), row(b[1], 0.57, "rescore", trial=2),
                  row(a[2], 0.47, "rescore", trial=1), row(a[2], 0.45, "rescore", trial=2)])
    report.write_report(str(tmp_path), records, REPORT_CONFIG)
    md = (tmp_path / "report.md").read_text().splitlines()
    # Best cells, by search score; re-scored: the mean of each cell's ok re-scores (b0's failed third dropped):
    # b0 (0.50 + 0.54) / 2 = 52%, b1 (0.53 + 0.57) / 2 = 55%, a2 (0.47 + 0.45) / 2 = 46%; the probes were not.
    table = [line for line in md if re.match(r"\| [1-5] \| [12] \| \d", line)]
    assert table == [f"| 1 | 2 | 55.00% ± 1.00% | 52.00% | 100 | `{json.dumps(b[0])}` |",
                     f"| 2 | 2 | 52.00% ± 1.00% | 55.00% | 100 | `{json.dumps(b[1])}` |",
                     f"| 3 | 1 | 50.00% ± 1.00% | 46.00% | 100 | `{json.dumps(a[2])}` |",
                     f"| 4 | 2 | 48.00% ± 1.00% | – | 100 | `{json.dumps(b[3])}` |",
                     f"| 5 | 2 | 45.00% ± 1.00% | – | 100 | `{json.dumps(b[2])}` |"]
    # Levels, from the search's own rows only (the noise and re-score rows count in neither a level nor its time).
    # Level 1: ok 0.30 0.40 0.50 0.36, mean 1.56 / 4 = 39.00%; deviations -9 1 11 -3 points, population std
    # sqrt((81 + 1 + 121 + 9) / 4) = sqrt(53) = 7.28 points; 5 rows of 10 s.
    # Level 2: mean 2.42 / 5 = 48.40%; deviations 6.6 3.6 -3.4 -0.4 -6.4, std sqrt(109.2 / 5) = 4.67 points.
    # Spearman, beam and probes: predicted ranks (5 4 1 2 3), measured (5 4 2 3 1): d = 0 0 1 1 2,
    # 1 - 6 * 6 / (5 * 24) = +0.700. Probes alone: predicted (1 2 3), measured (2 3 1): d = 1 1 2, 1 - 6 * 6 / 24 = -0.500.
    assert "| 1 | 5 | 4 | 50.00% | 39.00% | 7.28% | no predictions at level 1 | no predictions at level 1 | 50 s |" in md
    assert "| 2 | 5 | 5 | 55.00% | 48.40% | 4.67% | +0.700 (5 cells) | -0.500 (3 cells) | 50 s |" in md
    # seed noise: a0 scored 0.30 and 0.34, sample std 0.02 * sqrt(2) = 2.83 points, under both spreads
    assert ("Seed noise: a cell's score moves by 2.83% (std) with its training seed alone; compare it with each "
            "level's spread.") in md
    assert not any("spread less than the seed noise" in line for line in md)
    whole = "\n".join(md)
    assert "Levels finished: 2 of 3  ·  10 cells scored (1 diverged or failed)" in whole
    assert "Spearman ρ over every predicted cell: +0.700 (5 cells)." in whole and "100 s in all" in whole
    # the best cell by the re-score, b1, drawn with its search score in the title
    assert report.against_baseline(pnas.best(records), records).startswith("conv4 in this space: not scored")
    assert pnas.best(records)["cell"] == b[1] and (tmp_path / "best_cell.png").exists()
    assert "each trained 60 meta-iterations) is not" in whole  # a config from before --rescore-iters: --meta-iters
    report.write_report(str(tmp_path), records, dict(REPORT_CONFIG, rescore_iters=300))
    assert "each trained 300 meta-iterations) is not" in (tmp_path / "report.md").read_text()


def test_a_corrupt_middle_line_of_the_log_exits_2_naming_the_line_and_the_fix_and_loses_nothing(
        tmp_path, monkeypatch, capsys):
    fake_search_command(monkeypatch)
    out = tmp_path / "run"
    args = ["--search", "--out", str(out), *TINY]
    with one_thread():
        assert autometa.main(args) == 0
    lines = (out / "search.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) > 5
    for bad, words in [('{"level": 1, "cell": [[1, "conv_3x3", 1, "ide\x00\x00\x00\n', "is not valid JSON"),
                       ("[1, 2]\n", "is not a search record (an object with cell, level and status)")]:
        (out / "search.jsonl").write_text("".join(lines[:2] + [bad] + lines[3:]))
        kept = contents(out)
        capsys.readouterr()
        with one_thread():
            status = autometa.main(args)
        err = one_error_sentence(capsys.readouterr().err, status, 2)
        assert err.startswith(f"autometa: error: line 3 of {out / 'search.jsonl'} {words}")
        assert err.endswith(": delete that line or start a new --out folder")
        assert contents(out) == kept  # every line kept, the bad one too, and best.json, report.md, config.json
    # the line put right, the same command resumes: nothing scored again, nothing lost
    (out / "search.jsonl").write_text("".join(lines))
    with one_thread():
        assert autometa.main(args) == 0
    assert (out / "search.jsonl").read_text() == "".join(lines)


def test_a_corrupt_config_json_exits_2_in_one_sentence_and_is_left_as_it_is(tmp_path, monkeypatch, capsys):
    fake_search_command(monkeypatch)
    search, train = tmp_path / "search", tmp_path / "train"
    with one_thread():
        assert autometa.main(["--search", "--out", str(search), *TINY]) == 0
    train.mkdir()
    whole = (search / "config.json").read_text()
    for text, words in [(whole[:len(whole) // 2], "is not valid JSON"), ("[1, 2]", "is not a run's config (a JSON object)")]:
        for out, args in [(search, ["--search", "--out", str(search), *TINY]), (train, train_args(train))]:
            (out / "config.json").write_text(text)
            kept = contents(out)
            capsys.readouterr()
            with one_thread():
                status = autometa.main(args)
            err = one_error_sentence(capsys.readouterr().err, status, 2)
            assert err == (f"autometa: error: {out / 'config.json'} {words}: delete it only if the run beside it is "
                           "yours to discard, or choose a new --out")
            assert contents(out) == kept  # the search's log and results too; --train wrote no checkpoint
    assert not (train / "last.pt").exists()


def test_a_level_where_no_candidate_trains_ends_the_search_in_one_sentence_and_keeps_every_row(
        tmp_path, monkeypatch, capsys):
    def diverging(cfg, splits, device, keep=None):  # every 2-block cell diverges, as scoring reports it
        def score(cell, trial=0, fresh=False, **options):
            if len(cell) == 2:
                return dict(accuracy=None, ci95=None, status="diverged", error="meta-loss became nan", seed=0)
            return dict(accuracy=fake_accuracy(cell), ci95=0.01, params=scoring.parameters(cfg, cell))
        return score

    fake_search_command(monkeypatch, diverging)
    out = tmp_path / "run"
    args = ["--search", "--out", str(out), *TINY]
    with one_thread():
        status = autometa.main(args)
    err = one_error_sentence(capsys.readouterr().err, status, 1)  # 1: the search failed; not bad input
    assert err == (f"autometa: search failed: no candidate of level 2 trained successfully: see "
                   f"{out / 'search.jsonl'} for each error")
    rows = read_lines(out / "search.jsonl")  # level 1 (3 sampled and conv4), its best cell settled by a 2nd seed,
    assert [(r["level"], r["status"]) for r in rows] == [(1, "ok")] * 5 + [(2, "diverged")] * 3  # beam 2, probe 1
    assert rows[4]["role"] == "noise"
    assert all(r["error"] == "meta-loss became nan" for r in rows[5:]) and not (out / "best.json").exists()
    # a diverged training is a result: the same command scores nothing again and ends the same way
    monkeypatch.setattr(scoring, "make_scorer", lambda *a, **k: lambda *a, **k: pytest.fail("scored again"))
    with one_thread():
        status = autometa.main(args)
    assert one_error_sentence(capsys.readouterr().err, status, 1) == err and read_lines(out / "search.jsonl") == rows
    # every level-1 candidate failed (an exception): the same sentence for level 1; a rerun tries them again
    def failing(cfg, splits, device, keep=None):
        def score(cell, **options):
            raise MemoryError("out of memory")
        return score
    monkeypatch.setattr(scoring, "make_scorer", failing)
    out = tmp_path / "failed"
    with one_thread():
        status = autometa.main(["--search", "--out", str(out), *TINY])
    assert one_error_sentence(capsys.readouterr().err, status, 1) == (
        f"autometa: search failed: no candidate of level 1 trained successfully: see {out / 'search.jsonl'} for "
        "each error")
    assert [r["status"] for r in read_lines(out / "search.jsonl")] == ["failed"] * 4
    monkeypatch.setattr(scoring, "make_scorer", fake_scorer)
    with one_thread():
        assert autometa.main(["--search", "--out", str(out), *TINY]) == 0
    assert [r["status"] for r in read_lines(out / "search.jsonl")[:8]] == ["failed"] * 4 + ["ok"] * 4


def test_no_rescore_and_no_noise_search_ends_with_its_own_best_by_its_own_score(tmp_path, monkeypatch, capsys):
    fake_search_command(monkeypatch)
    out = tmp_path / "run"
    with one_thread():
        assert autometa.main(["--search", "--out", str(out), *TINY, "--rescore", "0", "--noise", "0"]) == 0
    printed = capsys.readouterr().out
    rows = read_lines(out / "search.jsonl")
    assert {r["role"] for r in rows} <= set(pnas.SEARCH_ROLES) and len(rows) == 4 + 3  # no noise, no re-score row
    top = max(rows, key=lambda r: (r["accuracy"], -r["blocks"]))  # by hand: the best search score, fewer blocks on a tie
    best = json.loads((out / "best.json").read_text())
    assert best["cell"] == top["cell"] and best["accuracy"] == top["accuracy"] and best["ci95"] == top["ci95"]
    assert best["rescore"]["accuracy"] == top["accuracy"] and list(best["rescore"]["scores"]) == ["0"]  # its own
    assert "seed noise:" not in printed and "re-scored on fresh episodes" not in printed
    assert (f"validation accuracy {100 * top['accuracy']:.2f}% ± {100 * top['ci95']:.2f}% in the search; "
            "not re-scored (chance 20%)") in printed
    md = (out / "report.md").read_text()
    assert "Seed noise: not measured" in md and "| 1 | " in md and " | – | " in md.split("## Best cells")[1]


def test_eval_flags_override_the_checkpoints_settings_and_the_rest_come_from_it(tmp_path, monkeypatch, capsys):
    saved = config.make_config({"ways": 3, "queries": 2, "channels": 4, "eval_episodes": 6, "test_steps": 2,
                                "inner_lr": 0.2, "meta_batch": 2, "seed": 3})
    torch.manual_seed(0)
    model = scoring.build_model(saved, cells.CONV4_CELL)  # untrained weights evaluate as well as any
    checkpoint = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "config": config.config_dict(saved), "arch": json.dumps(cells.CONV4_CELL),
                "iteration": 0}, checkpoint)
    import training
    used, accuracy_of = [], training.checkpoint_accuracy

    def watched(cfg, *args):
        used.append(cfg)
        return accuracy_of(cfg, *args)
    monkeypatch.setattr(training, "checkpoint_accuracy", watched)

    def evaluate(*flags):
        with one_thread():
            assert autometa.main(["--eval", str(checkpoint), *flags]) == 0
        lines = capsys.readouterr().out.splitlines()
        return lines, float(re.search(r"test accuracy: ([\d.]+)%", lines[1]).group(1))

    lines, plain = evaluate()
    assert lines[0].endswith("on 6 test episodes, 3-way 1-shot, device cpu") and "(95% CI, 6 episodes)" in lines[1]
    lines, _ = evaluate("--eval-episodes", "4")
    assert lines[0].endswith("on 4 test episodes, 3-way 1-shot, device cpu") and "(95% CI, 4 episodes)" in lines[1]
    lines, unadapted = evaluate("--test-steps", "0")
    assert "(95% CI, 6 episodes)" in lines[1] and unadapted != plain  # no adaptation: another accuracy
    given = [(c.eval_episodes, c.test_steps) for c in used]
    assert given == [(6, 2), (4, 2), (6, 0)]  # each flag where given, the checkpoint's value elsewhere
    for cfg in used:  # every setting not given is the checkpoint's
        rest = {k: v for k, v in config.config_dict(cfg).items() if k not in ("eval_episodes", "test_steps")}
        assert rest == {k: v for k, v in config.config_dict(saved).items() if k not in ("eval_episodes", "test_steps")}


def test_a_diverged_cell_is_kept_on_resume_and_a_failed_one_is_tried_again(tmp_path):
    path = str(tmp_path / "search.jsonl")
    a, b, c, d = pnas.first_level(cells.OPS, 4, seed=0)

    def first_run(cell, trial=0, fresh=False):
        if cell == a:  # as scoring.make_scorer reports a maml.Diverged
            return dict(accuracy=None, ci95=None, status="diverged", error="meta-loss became nan")
        if cell == b:
            raise MemoryError("out of memory")
        return dict(accuracy=fake_accuracy(cell), ci95=0.01)

    pairs = [(cell, "first") for cell in (a, b, c, d)]
    log = pnas.SearchLog(path)
    assert [r["cell"] for r in pnas.score_level(log, 1, pairs, first_run, progress=quiet())] == [c, d]
    pnas.rescore(log, first_run, [a, b], [1], "noise", progress=quiet())  # re-scores: the same rule
    assert [r["status"] for r in read_lines(path)] == ["diverged", "failed", "ok", "ok", "diverged", "failed"]
    calls = []

    def second_run(cell, trial=0, fresh=False):
        calls.append((cell, trial))
        return dict(accuracy=fake_accuracy(cell), ci95=0.01)

    again = pnas.SearchLog(path)  # resumed from the file
    assert again.done(a) and not again.done(b) and again.done(a, "noise", 1) and not again.done(b, "noise", 1)
    ok = pnas.score_level(again, 1, pairs, second_run, progress=quiet())
    pnas.rescore(again, second_run, [a, b], [1], "noise", progress=quiet())
    assert calls == [(b, 0), (b, 1)]  # only the failed ones, once each
    assert [r["cell"] for r in ok] == [b, c, d] and again.records[pnas.cell_key(a)]["status"] == "diverged"
    rows = read_lines(path)
    assert len(rows) == 6 + 2 and [r["status"] for r in rows[6:]] == ["ok", "ok"]
    records = pnas.read_log(path)  # read back: the diverged row stands, the failed one superseded
    assert records[pnas.cell_key(a)]["status"] == "diverged" and records[pnas.cell_key(b)]["status"] == "ok"
    assert records[pnas.cell_key(b) + "#noise1"]["status"] == "ok"


@pytest.mark.slow
def test_a_searchs_scores_do_not_depend_on_the_processs_thread_count_or_threads(tmp_path, monkeypatch):
    # A search fixes torch's thread count (1, or --threads) whatever the process had (OMP_NUM_THREADS), so a
    # process started on 2 threads scores as one started on 1; --threads 2 is the way to change it.
    seen, make_scorer = [], scoring.make_scorer

    def watched(*args, **kwargs):
        score = make_scorer(*args, **kwargs)

        def threads_then_score(cell, **options):
            seen[-1].append(torch.get_num_threads())
            return score(cell, **options)
        return threads_then_score
    monkeypatch.setattr(scoring, "make_scorer", watched)
    tiny = ["--search", "--blocks", "1", "--max-first", "2", "--meta-iters", "3", "--eval-episodes", "4",
            "--channels", "4", "--ways", "3", "--queries", "2", "--probe", "0", "--noise", "0", "--rescore", "0",
            "--workers", "1"]
    threads = torch.get_num_threads()
    try:
        for name, process_threads, flag in (("omp2", 2, []), ("omp1", 1, []), ("threads2", 1, ["--threads", "2"])):
            torch.set_num_threads(process_threads)  # as OMP_NUM_THREADS starts a process
            seen.append([])
            assert autometa.main([*tiny, "--out", str(tmp_path / name), *flag]) == 0
    finally:
        torch.set_num_threads(threads)
    assert seen == [[1] * 3, [1] * 3, [2] * 3]  # conv4 and 2 sampled cells: on 1 thread whatever the process had
    timeless = [[{k: v for k, v in r.items() if k != "seconds"} for r in read_lines(tmp_path / name / "search.jsonl")]
                for name in ("omp2", "omp1")]
    assert timeless[0] == timeless[1] and len(timeless[0]) == 3
