"""The search space: cell encodings, the ops table and the networks built from a cell.

A cell is plain data: a tuple of blocks ``(in1, op1, in2, op2)``. Inputs are numbered
``0`` = output of the cell two back, ``1`` = output of the previous cell, ``2 + i`` = block i
of this cell. A block computes ``op1(h[in1]) + op2(h[in2])``; the cell concatenates all its
block outputs. Every BatchNorm uses the current batch's statistics
(``track_running_stats=False``), as MAML does, so a network behaves the same in training
and at test time.
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


class CellError(ValueError):
    """A malformed cell or architecture; the message names the problem and the fix."""


def bn(channels):
    """BatchNorm on the current batch's statistics (no running averages, as in MAML)."""
    return nn.BatchNorm2d(channels, track_running_stats=False)


class ReLUConvBN(nn.Sequential):
    """ReLU, then one or more convolutions, then BatchNorm."""

    def __init__(self, C, convs):
        super().__init__(nn.ReLU(), *convs, bn(C))


class FactorizedReduce(nn.Module):
    """Halve the resolution with two offset 1x1 stride-2 convolutions (the stride-2 identity)."""

    def __init__(self, C_in, C_out):
        super().__init__()
        assert C_out % 2 == 0, "FactorizedReduce needs an even channel count"
        self.conv1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = bn(C_out)

    def forward(self, x):
        x = F.relu(x)
        # Pad right/bottom so the shifted path gives the same size on odd inputs (21 -> 11).
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv1(x), self.conv2(shifted)], dim=1))


def sep_conv(C, stride):
    """Depthwise-separable 3x3, applied twice as in DARTS/PNAS."""
    return nn.Sequential(
        ReLUConvBN(C, [nn.Conv2d(C, C, 3, stride, 1, groups=C, bias=False), nn.Conv2d(C, C, 1, bias=False)]),
        ReLUConvBN(C, [nn.Conv2d(C, C, 3, 1, 1, groups=C, bias=False), nn.Conv2d(C, C, 1, bias=False)]),
    )


# name -> constructor(C, stride); every op maps (B, C, H, W) -> (B, C, H/stride, W/stride).
OPS = {
    "conv_3x3": lambda C, stride: ReLUConvBN(C, [nn.Conv2d(C, C, 3, stride, 1, bias=False)]),
    "conv_1x5_5x1": lambda C, stride: ReLUConvBN(C, [
        nn.Conv2d(C, C, (1, 5), (1, stride), (0, 2), bias=False),
        nn.Conv2d(C, C, (5, 1), (stride, 1), (2, 0), bias=False)]),
    "sep_conv_3x3": sep_conv,
    "dil_conv_3x3": lambda C, stride: ReLUConvBN(C, [
        nn.Conv2d(C, C, 3, stride, padding=2, dilation=2, groups=C, bias=False),
        nn.Conv2d(C, C, 1, bias=False)]),
    "max_pool_3x3": lambda C, stride: nn.MaxPool2d(3, stride, padding=1),
    "avg_pool_3x3": lambda C, stride: nn.AvgPool2d(3, stride, padding=1, count_include_pad=False),
    "identity": lambda C, stride: nn.Identity() if stride == 1 else FactorizedReduce(C, C),
}

# The cell Auto-Meta reported for Mini-ImageNet, in this file's input numbering.
AUTOMETA_CELL = (
    (1, "conv_3x3", 1, "max_pool_3x3"),
    (2, "conv_1x5_5x1", 2, "max_pool_3x3"),
    (2, "conv_3x3", 3, "conv_1x5_5x1"),
    (3, "conv_3x3", 3, "conv_3x3"),
    (3, "conv_1x5_5x1", 2, "conv_3x3"),
)
BUILTIN = {"conv4": "conv4", "autometa": AUTOMETA_CELL}


# ---------------------------------------------------------------------------- reading architectures

def parse_cell(blocks, ops=tuple(OPS)):
    """Validate JSON data as a cell and return it as a tuple of blocks."""
    if not isinstance(blocks, list) or not blocks:
        raise CellError("a cell must be a non-empty JSON list of blocks [in1, \"op1\", in2, \"op2\"]")
    cell = []
    for b, block in enumerate(blocks):
        if not (isinstance(block, (list, tuple)) and len(block) == 4):
            raise CellError(f"block {b} of the cell is {block!r}: write each block as [in1, \"op1\", in2, \"op2\"]")
        in1, op1, in2, op2 = block
        for i in (in1, in2):
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i <= b + 1:
                raise CellError(f"block {b} of the cell has input {i!r}: inputs of block {b} must be integers from 0 to {b + 1}")
        for op in (op1, op2):
            if op not in ops:
                raise CellError(f"block {b} of the cell uses unknown op {op!r}: choose one of {', '.join(ops)}")
        cell.append((in1, op1, in2, op2))
    return tuple(cell)


def load_arch(text):
    """An architecture from any of its written forms: a built-in name ('conv4', 'autometa'), an inline
    JSON list of blocks, a JSON file holding one, or a search's best.json. Returns 'conv4' or a cell tuple."""
    if text in BUILTIN:
        return BUILTIN[text]
    if text.lstrip().startswith("["):
        try:
            return parse_cell(json.loads(text))
        except json.JSONDecodeError as e:
            raise CellError(f"the cell {text!r} is not valid JSON ({e.msg}): write it as a JSON list of blocks "
                            "[in1, \"op1\", in2, \"op2\"]") from e
    if not os.path.isfile(text):
        raise CellError(f"architecture {text!r} is neither a built-in ({', '.join(BUILTIN)}), an inline JSON list "
                        "nor a JSON file: pass one of those")
    try:
        with open(text) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CellError(f"{text} is not valid JSON ({e}): write the cell as a JSON list of blocks") from e
    if isinstance(data, dict):
        if "cell" not in data:
            raise CellError(f"{text} has no \"cell\" entry: pass a JSON list of blocks or a search's best.json")
        data = data["cell"]
    return parse_cell(data)


def arch_name(arch):
    """'conv4' or the cell's JSON text: what logs and checkpoints record, and load_arch reads back."""
    return arch if arch == "conv4" else json.dumps([list(block) for block in arch])


# ---------------------------------------------------------------------------- networks

class Cell(nn.Module):
    """One cell: preprocess the two inputs to C channels, compute the blocks, concatenate them."""

    def __init__(self, cell, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.cell, self.reduction = cell, reduction
        used = {i for in1, _, in2, _ in cell for i in (in1, in2)}
        # Only inputs the cell reads get a preprocessing layer, so no parameter is left unused.
        self.pre0 = (FactorizedReduce(C_prev_prev, C) if reduction_prev
                     else ReLUConvBN(C, [nn.Conv2d(C_prev_prev, C, 1, bias=False)])) if 0 in used else None
        self.pre1 = ReLUConvBN(C, [nn.Conv2d(C_prev, C, 1, bias=False)]) if 1 in used else None
        # Only ops on the cell's inputs reduce; ops on block outputs already see the small size.
        self.ops = nn.ModuleList(
            OPS[op](C, 2 if reduction and i < 2 else 1)
            for in1, op1, in2, op2 in cell for i, op in ((in1, op1), (in2, op2)))
        self.out_channels = len(cell) * C

    def forward(self, s0, s1):
        h = [self.pre0(s0) if self.pre0 is not None else None,
             self.pre1(s1) if self.pre1 is not None else None]
        for b, (in1, _, in2, _) in enumerate(self.cell):
            h.append(self.ops[2 * b](h[in1]) + self.ops[2 * b + 1](h[in2]))
        return torch.cat(h[2:], dim=1)  # (B, len(cell) * C, H', W')


class Network(nn.Module):
    """Stem, `reductions + 1` stages of `cells` normal cells with a reduction cell between stages,
    global average pooling and a linear classifier. The same cell fills every position."""

    def __init__(self, cell, n_way, channels=16, cells=1, reductions=2, in_channels=3, stem_stride=1):
        super().__init__()
        C = channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C, 3, stem_stride, 1, bias=False), bn(C))
        C_prev_prev, C_prev, reduction_prev = C, C, False
        layers = []
        for stage in range(reductions + 1):
            positions = ([True] if stage > 0 else []) + [False] * cells
            for reduction in positions:
                if reduction:
                    C *= 2
                layer = Cell(cell, C_prev_prev, C_prev, C, reduction, reduction_prev)
                layers.append(layer)
                C_prev_prev, C_prev, reduction_prev = C_prev, layer.out_channels, reduction
        self.cells = nn.ModuleList(layers)
        self.classifier = nn.Linear(C_prev, n_way)

    def forward(self, x):  # x: (B, 3, H, W)
        s0 = s1 = self.stem(x)
        for layer in self.cells:
            s0, s1 = s1, layer(s0, s1)
        return self.classifier(s1.mean(dim=(2, 3)))  # (B, n_way)


class Conv4(nn.Sequential):
    """MAML's baseline: 4 x [3x3 conv, BN, ReLU, 2x2 max-pool], then a linear layer."""

    def __init__(self, n_way, channels=32, in_channels=3, image_size=84):
        if image_size < 16:
            raise CellError(f"conv4 halves the image 4 times and needs at least 16x16 images, not {image_size}: "
                            "raise --image-size")
        blocks = []
        for i in range(4):
            blocks += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1),
                       bn(channels), nn.ReLU(), nn.MaxPool2d(2)]
        side = image_size
        for _ in range(4):
            side //= 2
        super().__init__(*blocks, nn.Flatten(), nn.Linear(channels * side * side, n_way))


def build_network(arch, n_way, image_size, channels=16, cells=1, reductions=2, stem_stride=1):
    """'conv4' (32 filters, as in MAML) or a cell tuple -> an nn.Module mapping (B,3,H,W) -> (B,n_way)."""
    if arch == "conv4":
        return Conv4(n_way, image_size=image_size)
    return Network(arch, n_way, channels, cells, reductions, stem_stride=stem_stride)


def count_parameters(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
