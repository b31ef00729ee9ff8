"""MAML on many tasks at once: maml.py's adaptation under ``torch.func.vmap``, for a meta-batch's
meta-loss and for groups of evaluation episodes.

maml.py adapts one task at a time, so every small kernel of a meta-step runs once per task; on a
GPU that is launch overhead, and on a CPU it is per-op overhead. Here one vmapped call adapts
every task of a group: the inner gradient is ``torch.func.grad``, which composes with an outer
backward, so second order works too. The results are maml.py's (the tests compare them), but
``runs`` must say yes first: vmap cannot run every model (dropout, BatchNorm that keeps running
statistics, ``.item()``). Needs torch and maml.py::

    params = dict(model.named_parameters())
    if batched.runs(model, params, tasks):
        loss, accuracy = batched.meta_loss(model, params, tasks, steps=5, lr=0.01)        # as maml.meta_loss
        accuracies = batched.episode_accuracies(model, params, episodes, 10, 0.01, group=10)
"""
import contextlib
import itertools

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode

import maml


def adapt_and_predict(model, steps, lr, first_order=False):
    """f(params, xs, ys, xq) -> one task's query logits (N*Q, N) after `steps` SGD steps on its support
    set (xs, ys), written for vmap over tasks. With first_order=False it stays differentiable w.r.t. params."""
    def support_loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def run(params, xs, ys, xq):
        p = params
        for _ in range(steps):
            g = grad(support_loss)(p, xs, ys)
            p = {name: p[name] - lr * (g[name].detach() if first_order else g[name]) for name in p}
        return functional_call(model, p, (xq,))

    return run


def meta_loss(model, params, tasks, steps, lr, first_order=False):
    """maml.meta_loss with every task of the batch adapted at once: (mean query loss, mean query accuracy).

    tasks = (xs, ys, xq, yq): (T, N*K, C, H, W), (T, N*K), (T, N*Q, C, H, W), (T, N*Q).
    """
    adapt_predict = adapt_and_predict(model, steps, lr, first_order)

    def task(p, xs, ys, xq, yq):
        logits = adapt_predict(p, xs, ys, xq)  # (N*Q, N)
        return F.cross_entropy(logits, yq), (logits.argmax(dim=1) == yq).float().mean()

    # Under vmap, the second derivative of PyTorch's fused BatchNorm w.r.t. its input is wrong
    # (pytorch/functorch#534): second order runs BatchNorm as plain tensor ops instead.
    with contextlib.nullcontext() if first_order else ComposedBatchNorm():
        losses, correct = vmap(task, in_dims=(None, 0, 0, 0, 0))(params, *tasks)  # (T,), (T,)
    return losses.mean(), correct.mean().item()


def episode_accuracies(model, params, episodes, steps, lr, group=10):
    """maml.episode_accuracies with `group` episodes adapted and tested at once: a list of floats.

    `episodes` yields task batches as in meta_loss; every task counts as one episode.
    """
    device = next(iter(params.values())).device
    start = {name: p.detach() for name, p in params.items()}
    run = vmap(adapt_and_predict(model, steps, lr, first_order=True), in_dims=(None, 0, 0, 0))
    tasks = (task for batch in episodes for task in zip(*maml.to_device(batch, device)))
    accuracies = []
    while chunk := list(itertools.islice(tasks, group)):
        xs, ys, xq, yq = (torch.stack(t) for t in zip(*chunk))
        with torch.no_grad():  # no graph back to `params`; torch.func.grad inside still differentiates
            logits = run(start, xs, ys, xq)  # (group, N*Q, N)
        if not torch.isfinite(logits).all():
            raise maml.Diverged("adapted predictions became NaN or infinite during evaluation")
        accuracies += (logits.argmax(dim=2) == yq).float().mean(dim=1).tolist()
    return accuracies


def runs(model, params, tasks):
    """Whether vmap can run `model` on tasks shaped like these, second order included. It tries two of
    them on copies of the buffers, the random streams restored: nothing of the model changes."""
    device = next(iter(params.values())).device
    state = {**{name: b.clone() for name, b in model.named_buffers()}, **params}
    two = tuple(t[:1].expand(2, *t.shape[1:]) for t in maml.to_device(tasks, device))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            meta_loss(model, state, two, 1, 0.0, first_order=False)
        except RuntimeError:  # vmap's refusals: random ops, in-place updates of unbatched buffers, .item()
            return False
    return True


class ComposedBatchNorm(TorchFunctionMode):
    """Within it, F.batch_norm on batch statistics runs as mean, variance and arithmetic (``batch_norm``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.batch_norm:
            return batch_norm(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """F.batch_norm from plain tensor ops where it normalises by batch statistics and keeps no running ones."""
    if not training or running_mean is not None or running_var is not None:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    dims = [0, *range(2, input.dim())]                     # all but the channel dimension
    shape = [1, -1] + [1] * (input.dim() - 2)              # (C,) -> (1, C, 1, ...)
    centred = input - input.mean(dims, keepdim=True)
    out = centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.view(shape)
    return out if bias is None else out + bias.view(shape)
