"""The search space: cell encodings, the ops table and the one network built around a cell.

A cell is plain data: a tuple of blocks ``(in1, op1, in2, op2)``. Inputs are numbered
``0`` = output of the cell two back, ``1`` = output of the previous cell, ``2 + i`` = block i
of this cell. A block computes ``op1(h[in1]) + op2(h[in2])``, where the op ``none`` contributes
nothing, so ``[[1, "conv_3x3", 1, "none"]]`` is one convolution. The cell's output is the
concatenation of its loose ends (the blocks no other block reads), as in PNAS and NASNet.

The network is MAML's conv4 with the cell in place of its convolutions 2-4: a 3x3 convolution
stem, stages of cells separated by fixed 2x2 max-pools at one width, and conv4's head. The
cell ``CONV4_CELL`` makes it conv4 exactly (less the conv biases that BatchNorm cancels).
Every BatchNorm uses the current batch's statistics (``track_running_stats=False``), as MAML
does, so a network behaves the same in training and at test time.
"""
import functools
import json
import os

import torch
import torch.nn as nn


class CellError(ValueError):
    """A malformed cell or architecture; the message names the problem and the fix."""


def bn(channels):
    """BatchNorm on the current batch's statistics (no running averages, as in MAML)."""
    return nn.BatchNorm2d(channels, track_running_stats=False)


class ReLUConvBN(nn.Sequential):
    """ReLU, then one or more convolutions, then BatchNorm."""

    def __init__(self, C, convs):
        super().__init__(nn.ReLU(), *convs, bn(C))


def sep_conv(C):
    """Depthwise-separable 3x3, applied twice as in DARTS/PNAS."""
    return nn.Sequential(
        ReLUConvBN(C, [nn.Conv2d(C, C, 3, 1, 1, groups=C, bias=False), nn.Conv2d(C, C, 1, bias=False)]),
        ReLUConvBN(C, [nn.Conv2d(C, C, 3, 1, 1, groups=C, bias=False), nn.Conv2d(C, C, 1, bias=False)]),
    )


# name -> constructor(C); every op maps (B, C, H, W) -> (B, C, H, W). "none" builds nothing: a block
# half that contributes nothing (DARTS's zero op), so the block is its other half alone.
OPS = {
    "conv_3x3": lambda C: ReLUConvBN(C, [nn.Conv2d(C, C, 3, 1, 1, bias=False)]),
    "conv_1x5_5x1": lambda C: ReLUConvBN(C, [nn.Conv2d(C, C, (1, 5), 1, (0, 2), bias=False),
                                             nn.Conv2d(C, C, (5, 1), 1, (2, 0), bias=False)]),
    "sep_conv_3x3": sep_conv,
    "dil_conv_3x3": lambda C: ReLUConvBN(C, [nn.Conv2d(C, C, 3, 1, padding=2, dilation=2, groups=C, bias=False),
                                             nn.Conv2d(C, C, 1, bias=False)]),
    "max_pool_3x3": lambda C: nn.MaxPool2d(3, 1, padding=1),
    "avg_pool_3x3": lambda C: nn.AvgPool2d(3, 1, padding=1, count_include_pad=False),
    "identity": lambda C: nn.Identity(),
    "none": None,
}

# MAML's conv4 in this space: each cell one 3x3 convolution (ReLU, conv, BN) of the previous cell.
CONV4_CELL = ((1, "conv_3x3", 1, "none"),)
# The cell Auto-Meta reported for Mini-ImageNet, in this file's input numbering.
AUTOMETA_CELL = (
    (1, "conv_3x3", 1, "max_pool_3x3"),
    (2, "conv_1x5_5x1", 2, "max_pool_3x3"),
    (2, "conv_3x3", 3, "conv_1x5_5x1"),
    (3, "conv_3x3", 3, "conv_3x3"),
    (3, "conv_1x5_5x1", 2, "conv_3x3"),
)
BUILTIN = {"conv4": CONV4_CELL, "autometa": AUTOMETA_CELL}

# The version of the network around a cell, recorded in config.json, best.json and checkpoints. Version 1
# (a stride-2 stem, ReLU-1x1-conv inputs, stride-2 reduction cells) gave the same cell another network.
SKELETON = 2
OLD_SKELETON = "the old network around its cells (stride-2 stem, reduction cells)"  # how refusals name version 1


# ---------------------------------------------------------------------------- reading architectures

def parse_cell(blocks, ops=tuple(OPS)):
    """Validate JSON data (or a cell tuple) as a cell and return it as a tuple of blocks."""
    if not isinstance(blocks, (list, tuple)) or not blocks:
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
        if op1 == op2 == "none":
            raise CellError(f"block {b} of the cell has two none halves and computes nothing: give it at least one "
                            "other op")
        cell.append((in1, op1, in2, op2))
    return tuple(cell)


def load_arch(text):
    """A cell from any of its written forms: a built-in name ('conv4', 'autometa'), an inline JSON list
    of blocks, a JSON file holding one, or a search's best.json. Returns a cell tuple."""
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
        if "config" in data and data.get("skeleton") != SKELETON:
            raise CellError(f"{text} was written by a search in {OLD_SKELETON}, where its cell meant another "
                            "network: search again, or pass the cell as an inline JSON list to train it in this network")
        data = data["cell"]
    return parse_cell(data)


def read_inputs(cell):
    """The input numbers the cell's halves read (a "none" half reads nothing)."""
    return {i for in1, op1, in2, op2 in cell for i, op in ((in1, op1), (in2, op2)) if op != "none"}


def loose_ends(cell):
    """Input numbers (2 + i) of the blocks no other block reads: their outputs, concatenated, are the cell's."""
    read = read_inputs(cell)
    return [b + 2 for b in range(len(cell)) if b + 2 not in read]


# ---------------------------------------------------------------------------- networks

def project(C_in, C):
    """A cell input as C channels: as it is when it has C, else ReLU, 1x1 convolution, BatchNorm."""
    return nn.Identity() if C_in == C else ReLUConvBN(C, [nn.Conv2d(C_in, C, 1, bias=False)])


class Cell(nn.Module):
    """One cell at width C: its inputs projected to C channels where they differ, the blocks, the loose
    ends concatenated."""

    def __init__(self, cell, C_prev_prev, C_prev, C):
        super().__init__()
        self.cell = cell
        # each block's real halves (input, op): a "none" half reads nothing and has no weights
        self.halves = [[(i, op) for i, op in ((in1, op1), (in2, op2)) if op != "none"] for in1, op1, in2, op2 in cell]
        read = read_inputs(cell)
        # Only inputs the cell reads get a projection, so no parameter is left unused.
        self.pre0 = project(C_prev_prev, C) if 0 in read else None
        self.pre1 = project(C_prev, C) if 1 in read else None
        self.ops = nn.ModuleList(OPS[op](C) for halves in self.halves for _, op in halves)
        self.loose = loose_ends(cell)
        self.out_channels = len(self.loose) * C

    def forward(self, s0, s1):  # s0, s1: (B, C_prev_prev, H, W), (B, C_prev, H, W)
        h = [self.pre0(s0) if self.pre0 is not None else None,
             self.pre1(s1) if self.pre1 is not None else None]
        ops = iter(self.ops)
        for halves in self.halves:
            outs = [next(ops)(h[i]) for i, _ in halves]
            h.append(outs[0] if len(outs) == 1 else outs[0] + outs[1])
        return h[self.loose[0]] if len(self.loose) == 1 else torch.cat([h[i] for i in self.loose], dim=1)


class Network(nn.Module):
    """conv4's skeleton around a cell: stem (3x3 convolution, BatchNorm) and a 2x2 max-pool, then
    `reductions + 1` stages of `cells` cells at `channels` channels with a 2x2 max-pool between stages,
    and conv4's head (ReLU, 2x2 max-pool, flatten, linear). The same cell fills every position; with
    CONV4_CELL and reductions=2, cells=1 it is MAML's conv4."""

    def __init__(self, cell, n_way, image_size, channels=32, cells=1, reductions=2, in_channels=3):
        super().__init__()
        side = image_size // 2 ** (reductions + 2)  # after every max-pool
        if side < 1:
            raise CellError(f"the network max-pools {reductions + 2} times and needs images of at least "
                            f"{2 ** (reductions + 2)}x{2 ** (reductions + 2)} pixels, not {image_size}x{image_size}: raise --image-size "
                            "or lower --reductions")
        C = channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1, bias=False), bn(C))
        self.pool = nn.MaxPool2d(2)
        layers, self.pooled = [], []  # pooled[k]: whether a max-pool comes before cell k (it starts a stage)
        C_prev_prev = C_prev = C
        for stage in range(reductions + 1):
            for k in range(cells):
                layers.append(Cell(cell, C_prev_prev, C_prev, C))
                self.pooled.append(stage > 0 and k == 0)
                C_prev_prev, C_prev = C_prev, layers[-1].out_channels
        self.cells = nn.ModuleList(layers)
        self.head = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.classifier = nn.Linear(C_prev * side * side, n_way)

    def forward(self, x):  # x: (B, 3, H, W)
        s0 = s1 = self.pool(self.stem(x))  # (B, C, H/2, W/2)
        for layer, pooled in zip(self.cells, self.pooled):
            if pooled:
                s0, s1 = self.pool(s0), self.pool(s1)
            s0, s1 = s1, layer(s0, s1)
        return self.classifier(self.head(s1))  # (B, n_way)


def build_network(cell, n_way, image_size, channels=32, cells=1, reductions=2):
    """A cell tuple -> the nn.Module mapping (B, 3, H, W) -> (B, n_way) around it (CONV4_CELL: conv4)."""
    return Network(cell, n_way, image_size, channels, cells, reductions)


def parameter_count(cell, n_way, image_size, channels=32, cells=1, reductions=2, in_channels=3):
    """count_parameters(build_network(...)) without building the network: a search counts thousands of children."""
    C = channels
    reads = read_inputs(cell)
    ops = sum(op_parameters(op, C) for block in cell for op in block[1::2] if op != "none")
    out = len(loose_ends(cell)) * C

    def projection(C_in):  # ReLU, 1x1 convolution, BatchNorm; nothing where the width is already C
        return 0 if C_in == C else C_in * C + 2 * C

    total = in_channels * 9 * C + 2 * C  # the stem
    C_prev_prev = C_prev = C
    for _ in range((reductions + 1) * cells):
        total += ops + (projection(C_prev_prev) if 0 in reads else 0) + (projection(C_prev) if 1 in reads else 0)
        C_prev_prev, C_prev = C_prev, out
    side = image_size // 2 ** (reductions + 2)
    return total + C_prev * side * side * n_way + n_way


@functools.lru_cache(maxsize=None)
def op_parameters(op, C):
    """Parameters of one op at width C."""
    return count_parameters(OPS[op](C))


def count_parameters(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
