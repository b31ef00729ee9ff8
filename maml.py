"""MAML (Finn et al., 2017) with explicit fast weights, for any nn.Module.

Fast weights are a dict name -> tensor, run with ``torch.func.functional_call``, so any network
works without per-layer code. One ``adapt()`` serves meta-training and evaluation. Second order
keeps the inner loop's graph (``create_graph=True``) and differentiates through it; first order
drops it, so the meta-gradient is the query loss's gradient taken at the adapted weights.

To meta-train your own model (a task batch is xs, ys, xq, yq as in ``meta_loss``)::

    import torch, maml
    model = MyNet()                                   # any nn.Module mapping images to logits
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    maml.meta_train(model, optimizer, sample=lambda: my_task_batch(), iterations=1000, steps=5, lr=0.01)
    accuracy, ci95 = maml.evaluate(model, dict(model.named_parameters()), test_batches, steps=10, lr=0.01)

This file needs torch alone: copy it into your project as it is.
"""
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call


class Diverged(RuntimeError):
    """The meta-training loss or the adapted predictions became NaN or infinite."""


def adapt(model, params, x, y, steps, lr, first_order=False):
    """`steps` SGD steps of cross-entropy on the support set (x, y) from `params`; returns the adapted dict.

    x: (N*K, C, H, W), y: (N*K,). With first_order=False the result stays differentiable w.r.t. `params`.
    """
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order,
                                    allow_unused=True, materialize_grads=True)
        params = {name: p - lr * g for (name, p), g in zip(params.items(), grads)}
    return params


def meta_loss(model, params, tasks, steps, lr, first_order=False):
    """Mean query loss after adaptation (differentiable w.r.t. `params`) and mean query accuracy.

    tasks = (xs, ys, xq, yq): (T, N*K, C, H, W), (T, N*K), (T, N*Q, C, H, W), (T, N*Q).
    """
    xs, ys, xq, yq = tasks
    losses, correct = [], []
    for t in range(xs.shape[0]):
        fast = adapt(model, params, xs[t], ys[t], steps, lr, first_order)
        logits = functional_call(model, fast, (xq[t],))  # (N*Q, N)
        losses.append(F.cross_entropy(logits, yq[t]))
        correct.append((logits.argmax(dim=1) == yq[t]).float().mean())
    return torch.stack(losses).mean(), torch.stack(correct).mean().item()


def meta_step(model, optimizer, tasks, steps, lr, first_order=False, meta_loss=meta_loss):
    """One outer update on a batch of tasks; returns (loss, accuracy) and raises Diverged on NaN/inf.

    `meta_loss` is this file's, or any function with its arguments and results (one that adapts the
    tasks together, say).
    """
    params = dict(model.named_parameters())
    loss, accuracy = meta_loss(model, params, tasks, steps, lr, first_order)
    if not torch.isfinite(loss):
        raise Diverged(f"meta-loss became {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), accuracy


def to_device(tasks, device):
    """Move a task batch (a tuple of tensors) to `device`."""
    return tuple(t.to(device, non_blocking=True) for t in tasks)


def meta_train(model, optimizer, sample, iterations, steps, lr, first_order=False, start=0, callback=None,
               meta_loss=meta_loss):
    """Meta-train for iterations start..iterations-1; `sample()` gives a task batch, `callback(i, loss, acc)`."""
    device = next(model.parameters()).device
    for i in range(start, iterations):
        loss, accuracy = meta_step(model, optimizer, to_device(sample(), device), steps, lr, first_order, meta_loss)
        if callback is not None:
            callback(i, loss, accuracy)


def episode_accuracies(model, params, episodes, steps, lr):
    """Query accuracy of every episode after first-order adaptation from `params`, as a list of floats.

    Each element of `episodes` is a task batch as in `meta_loss`; every task counts as one episode.
    """
    device = next(iter(params.values())).device
    start = {name: p.detach().requires_grad_() for name, p in params.items()}
    accuracies = []
    for tasks in episodes:
        xs, ys, xq, yq = to_device(tasks, device)
        for t in range(xs.shape[0]):
            with torch.enable_grad():
                fast = adapt(model, start, xs[t], ys[t], steps, lr, first_order=True)
            with torch.no_grad():
                logits = functional_call(model, fast, (xq[t],))  # (N*Q, N)
            if not torch.isfinite(logits).all():
                raise Diverged("adapted predictions became NaN or infinite during evaluation")
            accuracies.append((logits.argmax(dim=1) == yq[t]).float().mean().item())
    return accuracies


def evaluate(model, params, episodes, steps, lr, per_episode=episode_accuracies):
    """Mean query accuracy over `episodes` and its 95% interval, 1.96 * std / sqrt(n); `per_episode` is
    episode_accuracies or a function with its arguments and result."""
    accuracies = per_episode(model, params, episodes, steps, lr)
    n = len(accuracies)
    mean = sum(accuracies) / n
    std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / n)
    return mean, 1.96 * std / math.sqrt(n)
