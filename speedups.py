"""The speed-ups a meta-training gets, chosen in one place for its device and network: scoring.py,
training.py and bench.py pass them to maml.py, which never needs them.

- CPU: fastcpu.py (channels-last task batches, leaner double backwards) with maml.py's per-task
  meta-loss, which vmap does not beat on a CPU.
- CUDA: all tasks of a meta-batch adapted at once (``batched.meta_loss``).
- Both: evaluation episodes adapted ``eval_batch`` at a time (``batched.episode_accuracies``). On a
  CPU that pays only for small networks, where per-op overhead dominates: on larger ones vmap's
  convolutions with per-episode weights are slower than the per-task loop (docs/speed.md).

Wherever vmap cannot run the network (``batched.runs``), maml.py's loop runs instead.
"""
import contextlib
import itertools
from typing import Callable, NamedTuple

import torch.nn as nn

import batched
import fastcpu
import maml

EVAL_BATCH = 10  # episodes per vmapped evaluation call with --eval-batch 0 (automatic)
# On a CPU, automatic batched evaluation is for networks whose first convolution gives at most this
# many values per image: 8 channels at 14x14 do; conv4's stem, 32 channels at 28x28, and with it every
# network of the default search, does not.
SMALL_NETWORK = 4096


class Speedups(NamedTuple):
    layout: Callable       # layout(tasks): a task batch stored as this device runs it fastest
    meta_loss: Callable    # maml.meta_loss's arguments and result, for maml.meta_train(meta_loss=...)
    per_episode: Callable  # maml.episode_accuracies's arguments and result, for maml.evaluate(per_episode=...)


PLAIN = Speedups(lambda tasks: tasks, maml.meta_loss, maml.episode_accuracies)  # maml.py as written


def choose(model, first_order, eval_batch=0):
    """The Speedups for `model` on its device; `eval_batch` as --eval-batch (0: automatic).

        fast = speedups.choose(model, first_order)
        maml.meta_train(model, optimizer, lambda: fast.layout(sample()), ..., meta_loss=fast.meta_loss)
    """
    cpu = next(model.parameters()).device.type == "cpu"
    vmappable = {}  # task shapes -> whether vmap runs the model on them

    def runs(params, tasks):
        shapes = tuple(t.shape[1:] for t in tasks)
        if shapes not in vmappable:
            vmappable[shapes] = batched.runs(model, params, tasks)
        return vmappable[shapes]

    def meta_loss(model, params, tasks, steps, lr, first_order=False):
        if not cpu and runs(params, tasks):
            return batched.meta_loss(model, params, tasks, steps, lr, first_order)
        with contextlib.nullcontext() if first_order or not cpu else fastcpu.SecondOrderKernels():
            return maml.meta_loss(model, params, tasks, steps, lr, first_order)

    def per_episode(model, params, episodes, steps, lr):
        episodes = iter(episodes)
        first = next(episodes, None)
        if first is None:
            return []
        episodes = itertools.chain([first], episodes)
        group = eval_batch or automatic_group(model, first, cpu)
        if group > 1 and runs(params, first):
            return batched.episode_accuracies(model, params, episodes, steps, lr, group)
        return maml.episode_accuracies(model, params, episodes, steps, lr)

    return Speedups(fastcpu.layout_for(model), meta_loss, per_episode)


def automatic_group(model, tasks, cpu):
    """Evaluation episodes per vmapped call for --eval-batch 0: EVAL_BATCH on a GPU and for small networks
    on a CPU (SMALL_NETWORK), otherwise 1 (one at a time)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if not cpu or conv is None:
        return EVAL_BATCH
    height, width = tasks[0].shape[-2:]
    values = conv.out_channels * (height // conv.stride[0]) * (width // conv.stride[1])
    return EVAL_BATCH if values <= SMALL_NETWORK else 1
