"""CPU speed-ups for maml.py's meta-step, which the command line and --bench switch on; maml.py never needs them.

- **Channels-last images.** oneDNN's convolutions, BatchNorm and pooling run faster on images stored
  channels-last. ``speedups`` stores each task batch that way, so every pass ``maml.meta_loss``
  makes (support, query, evaluation) runs in that layout, once the model gave the same outputs both ways.
- **Leaner double backwards** (``SecondOrderKernels``). Second order differentiates the support passes
  twice. There PyTorch's BatchNorm builds its double backward from many small ops, and its convolution
  also computes a gradient for the images. Ours keep PyTorch's forward and first backward kernels,
  so values and first gradients are PyTorch's bit for bit; only the derivatives of those gradients
  are computed differently.
- **Freed memory reused** (``reuse_freed_memory``), a process setting for glibc's malloc.

docs/speed.md holds the measurements; ``python autometa.py --bench`` repeats them.
"""
import contextlib
import ctypes
import ctypes.util

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.overrides import TorchFunctionMode


@contextlib.contextmanager
def speedups(model, first_order):
    """Within it, on CPU, `layout(tasks)` stores a task batch channels-last where that is safe for `model`,
    and second-order adaptation gets the leaner double backwards. Yields `layout`.

        with fastcpu.speedups(model, first_order) as layout:
            maml.meta_train(model, optimizer, lambda: layout(sampler.sample(4)), ...)
    """
    cpu = next(model.parameters()).device.type == "cpu"
    with contextlib.nullcontext() if first_order or not cpu else SecondOrderKernels():
        yield layout_for(model)


def layout_for(model):
    """layout(tasks): on CPU, the task batch stored channels-last where that is safe for `model` (checked
    once per shape); on other devices, or where it is not safe, the batch as it is."""
    if next(model.parameters()).device.type != "cpu":
        return lambda tasks: tasks
    safe = {}  # (support shape, query shape) -> whether channels-last gives the same outputs

    def layout(tasks):
        xs, ys, xq, yq = tasks
        if xs.dim() != 5:
            return tasks
        shapes = (xs.shape[1:], xq.shape[1:])
        if shapes not in safe:
            params = dict(model.named_parameters())
            safe[shapes] = channels_last_ok(model, params, xs[0]) and channels_last_ok(model, params, xq[0])
        return (channels_last(xs), ys, channels_last(xq), yq) if safe[shapes] else tasks

    return layout


def channels_last(images):
    """(T, M, C, H, W) images stored so that every images[t] is a channels-last (M, C, H, W) tensor."""
    return images.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def channels_last_ok(model, params, x):
    """Whether `model` gives the same outputs on both layouts, and has no convolution that oneDNN gets wrong.

    oneDNN's channels-last 1x1 stride-2 convolution computes wrong weight gradients when it has fewer
    input channels than its SIMD block, 8 or 16 (uxlfoundation/oneDNN#6035); a model with any 1x1
    kernel on fewer than 16 channels keeps the plain layout. The check leaves buffers and RNG as they were.
    """
    if any(p.dim() == 4 and p.shape[-2:] == (1, 1) and p.shape[1] < 16 for p in params.values()):
        return False
    state = {**{name: b.clone() for name, b in model.named_buffers()}, **params}
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        try:
            fast = functional_call(model, state, (x.contiguous(memory_format=torch.channels_last),))
            plain = functional_call(model, state, (x,))
        except RuntimeError:  # e.g. a .view() of activations, which needs the contiguous layout
            return False
    # Rounding differs between the layouts (~1e-4 relative in a deep float32 network); a wrong result would not.
    return bool((fast - plain).abs().max() <= 1e-3 * plain.abs().max() + 1e-6)


class SecondOrderKernels(TorchFunctionMode):
    """Within it, F.batch_norm on batch statistics and F.conv2d, on CPU, get cheaper double backwards.

    Their forward and first backward call PyTorch's own kernels, so values and first gradients are
    PyTorch's bit for bit; only the derivatives of those gradients are ours. BatchNorm's
    (``BatchNormGrad.backward``) takes about 15 tensor passes in place of PyTorch's composite of about 40.
    Convolution's (``ConvolutionGrad.backward``) skips the gradient for inputs that need none, such as
    the images. Anything else, and other devices, run unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.batch_norm:
            return batch_norm(*args, **(kwargs or {}))
        if func is F.conv2d:
            return conv2d(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """F.batch_norm, as ``BatchNorm`` (a cheaper double backward) where it normalises by batch statistics on CPU."""
    if not training or input.device.type != "cpu" or input.dim() < 2 or input.numel() <= input.shape[1] or eps <= 0:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)  # its checks and errors
    return BatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps)


class BatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm through PyTorch's own CPU kernel (which also updates running statistics);
    its backward is ``BatchNormGrad``."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, invstd = ctx.saved_tensors
        gx, gw, gb = BatchNormGrad.apply(gy, x, weight, mean, invstd, ctx.eps)
        return gx, gw if ctx.needs_input_grad[1] else None, gb if ctx.needs_input_grad[2] else None, None, None, None, None


class BatchNormGrad(torch.autograd.Function):
    """BatchNorm's backward: PyTorch's kernel forward, and closed-form derivatives of it as its own backward.

    Per channel, with x_hat = (x - mean) * s, s = 1 / sqrt(var + eps), and <.> the mean over the channel's
    M values, PyTorch's backward computes
        gx = w*s*(gy - <gy> - x_hat*<gy*x_hat>),   gw = M*<gy*x_hat>,   gb = M*<gy>.
    Given the gradients (ggx, ggw, ggb) of a loss on (gx, gw, gb), differentiating these gives
        d gy = w*s*(ggx - <ggx> - x_hat*<ggx*x_hat>) + ggw*x_hat + ggb
        d w  = M*s*A,   A = <ggx*gy> - <gy><ggx> - <gy*x_hat><ggx*x_hat>
        d x  = s*(V - <V> - x_hat*(<x_hat*V> + w*s*A)),   V = beta*gy - w*s*<gy*x_hat>*ggx,
    with beta = ggw - w*s*<ggx*x_hat>; mean and var are functions of x, which d x accounts for.
    """

    @staticmethod
    def forward(ctx, gy, x, weight, mean, invstd, eps):
        ctx.save_for_backward(gy, x, weight, mean, invstd)
        return torch.ops.aten.native_batch_norm_backward(gy, x, weight, None, None, mean, invstd, True, eps,
                                                         [True, True, True])

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        gy, x, weight, mean, invstd = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]                    # all but the channel dimension
        M = x.numel() // x.shape[1]

        def channel(t):                                   # (C,) -> (1, C, 1, ...) to broadcast over x
            return t.view(1, -1, *[1] * (x.dim() - 2))

        def avg(t):                                       # <t>, (C,)
            return t.sum(dims) / M

        s = invstd
        ws = s if weight is None else s * weight
        x_hat = torch.addcmul(channel(-mean * s), x, channel(s))
        gy_mean, gy_xhat = avg(gy), avg(gy * x_hat)
        ggx_mean, ggx_xhat = avg(ggx), avg(ggx * x_hat)
        A = avg(ggx * gy) - gy_mean * ggx_mean - gy_xhat * ggx_xhat
        beta = ggw - ws * ggx_xhat
        d_gy = torch.addcmul(channel(ggb - ws * ggx_mean), x_hat, channel(beta)).addcmul_(ggx, channel(ws))
        V_mean = beta * gy_mean - ws * gy_xhat * ggx_mean             # <V>
        xhat_V_mean = beta * gy_xhat - ws * gy_xhat * ggx_xhat        # <x_hat*V>
        d_x = torch.addcmul(channel(-s * V_mean), x_hat, channel(-s * (xhat_V_mean + ws * A)))
        d_x.addcmul_(gy, channel(s * beta)).addcmul_(ggx, channel(-s * ws * gy_xhat))
        d_w = None if weight is None else M * s * A
        return d_gy, d_x, d_w, None, None, None


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """F.conv2d, as ``Convolution`` (a leaner double backward) for batched input on CPU with numeric padding."""
    if input.device.type != "cpu" or input.dim() != 4 or isinstance(padding, str):
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)

    def pair(v):
        return list(v) if isinstance(v, (tuple, list)) else [v, v]

    return Convolution.apply(input, weight, bias, (pair(stride), pair(padding), pair(dilation), groups))


class Convolution(torch.autograd.Function):
    """A 2-D convolution through PyTorch's own kernel; its backward is ``ConvolutionGrad``."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry):
        stride, padding, dilation, groups = geometry
        ctx.save_for_backward(x, weight)
        ctx.geometry = geometry
        return torch.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gx, gw, gb = ConvolutionGrad.apply(gy, x, weight, ctx.geometry, list(ctx.needs_input_grad[:3]))
        return gx, gw, gb, None


class ConvolutionGrad(torch.autograd.Function):
    """A convolution's backward (PyTorch's kernel, only the gradients in `needs`), and its derivatives.

    With y = conv(x, w) + b, the backward gives gx = conv^T(gy; w), linear in gy; gw = wgrad(x, gy),
    linear in x and in gy; gb = the sum of gy. Given a loss's gradients (ggx, ggw, ggb) on those,
    the adjoints give
        d gy = conv(ggx; w) + conv(x; ggw) + ggb,   d x = conv^T(gy; ggw),   d w = wgrad(ggx, gy),
    each only where it is needed. PyTorch's own double backward also computes d x for inputs that
    need no gradient, such as the images, and d w through a transposed convolution and a copy.
    """

    @staticmethod
    def forward(ctx, gy, x, weight, geometry, needs):
        stride, padding, dilation, groups = geometry
        ctx.set_materialize_grads(False)                 # a missing ggx, ggw or ggb means: skip its terms
        ctx.save_for_backward(gy, x, weight)
        ctx.geometry = geometry
        return torch.ops.aten.convolution_backward(gy, x, weight, [weight.shape[0]] if needs[2] else None, stride,
                                                   padding, dilation, False, [0, 0], groups, needs)

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        gy, x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry

        def conv(a, k, b=None):
            return torch.convolution(a, k, b, stride, padding, dilation, False, [0, 0], groups)

        def conv_backward(a, k, mask):                   # (d input, d weight) of conv(a, k) under gy
            return torch.ops.aten.convolution_backward(gy, a, k, None, stride, padding, dilation, False, [0, 0],
                                                       groups, mask + [False])[:2]

        d_gy = d_x = d_w = None
        if ctx.needs_input_grad[0]:
            if ggw is not None:
                d_gy = conv(x, ggw, ggb)
            if ggx is not None:
                d_gy = conv(ggx, weight, ggb) if d_gy is None else d_gy.add_(conv(ggx, weight))
            if d_gy is None and ggb is not None:
                d_gy = ggb.view(1, -1, 1, 1).expand_as(gy)
        if ctx.needs_input_grad[1] and ggw is not None:
            d_x = conv_backward(x, ggw, [True, False])[0]
        if ctx.needs_input_grad[2] and ggx is not None:
            d_w = conv_backward(ggx, weight, [False, True])[1]
        return d_gy, d_x, d_w, None, None


def reuse_freed_memory():
    """Make glibc's malloc keep the memory that freed tensors give back and hand it out again.

    By default glibc serves every large allocation (from 128 KiB, rising to at most 32 MiB) with a
    fresh mmap and returns it to the system when freed, so each forward pass over a batch of
    84x84 images page-faults and zero-fills its activations anew.
    Afterwards every allocation comes from one heap, shared by all threads, that is never trimmed,
    so the process keeps its peak memory, as CUDA's caching allocator does. A process-wide
    setting: call it once at start-up. Returns False where the C library has no mallopt (macOS,
    Windows, musl).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # from glibc's malloc.h
    return all([mallopt(m_mmap_max, 0), mallopt(m_trim_threshold, 2**31 - 1), mallopt(m_arena_max, 1)])
