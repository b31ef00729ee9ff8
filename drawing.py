"""Drawing with pillow alone: the primitives every picture here uses (fonts, colours, axes, legends) and
the cell diagram.

    draw_cell(cell, path)   the cell as a graph: its two inputs, each block's two ops and sum, the concat
"""
import math
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from files import atomic_write

WHITE, INK, MUTED, GRID = (255, 255, 255), (33, 33, 33), (110, 110, 110), (228, 228, 228)
BLUE, ORANGE, GREEN, RED = (31, 119, 180), (230, 115, 0), (44, 160, 44), (214, 39, 40)
PALETTE = [BLUE, ORANGE, GREEN, RED, (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207)]
# The built-in font has no Greek letters or en dashes: labels in images say 'rho' and '-'.
# Op boxes are coloured by kind, so a cell's mix of convolutions and pools shows at a glance.
OP_FILL = {"conv_3x3": (207, 226, 243), "conv_1x5_5x1": (207, 226, 243), "sep_conv_3x3": (214, 236, 208),
           "dil_conv_3x3": (214, 236, 208), "max_pool_3x3": (253, 226, 196), "avg_pool_3x3": (253, 226, 196),
           "identity": (232, 232, 232)}
TEXT_SIZE, SMALL_SIZE, TITLE_SIZE = 15, 13, 18


@lru_cache(maxsize=None)
def font(size):
    """Pillow's built-in scalable font (pillow >= 10.1) at `size` pixels."""
    return ImageFont.load_default(size=size)


def text_width(text, size=TEXT_SIZE):
    """Width in pixels of one line of text."""
    return font(size).getlength(text)


# ---------------------------------------------------------------------------- plot primitives

def nice_ticks(lo, hi, count=6):
    """About `count` round tick values whose range covers [lo, hi]."""
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / count
    base = 10 ** math.floor(math.log10(raw))
    step = min(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 10) for k in range(first, last + 1)]


def vertical_text(image, center, text, size=TEXT_SIZE):
    """Text rotated 90 degrees (read bottom to top), centred on `center`."""
    left, top, right, bottom = font(size).getbbox(text)
    tile = Image.new("RGBA", (right, bottom), (255, 255, 255, 0))
    ImageDraw.Draw(tile).text((0, 0), text, font=font(size), fill=INK)
    tile = tile.rotate(90, expand=True)
    image.paste(tile, (int(center[0] - tile.width / 2), int(center[1] - tile.height / 2)), tile)


def dashed(draw, start, end, color, width=2, dash=8):
    """A dashed straight line."""
    (x1, y1), (x2, y2) = start, end
    length = math.hypot(x2 - x1, y2 - y1)
    for k in range(0, int(length), 2 * dash):
        a, b = k / length, min(k + dash, length) / length
        draw.line([(x1 + a * (x2 - x1), y1 + a * (y2 - y1)), (x1 + b * (x2 - x1), y1 + b * (y2 - y1))],
                  fill=color, width=width)


def dot(draw, xy, color, radius=5, outline=WHITE):
    """A filled circle marker."""
    x, y = xy
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color, outline=outline)


def legend(draw, x, y, entries, gap=26):
    """Entries (kind, color, label) left to right from (x, y); kind is 'dot', 'line' or 'dash'."""
    for kind, color, label in entries:
        if kind == "dot":
            dot(draw, (x + 9, y + 8), color)
        elif kind == "line":
            draw.line([(x, y + 8), (x + 20, y + 8)], fill=color, width=3)
        else:
            dashed(draw, (x, y + 8), (x + 24, y + 8), color, dash=5)
        draw.text((x + 30, y), label, font=font(SMALL_SIZE + 1), fill=INK)
        x += 30 + text_width(label, SMALL_SIZE + 1) + gap


class Axes:
    """A plot area `box` = (left, top, right, bottom) in pixels showing data limits `xlim` x `ylim`."""

    def __init__(self, image, box, xlim, ylim):
        self.image, self.draw, self.box, self.xlim, self.ylim = image, ImageDraw.Draw(image), box, xlim, ylim

    def px(self, x, y):
        """Data coordinates -> pixel coordinates."""
        left, top, right, bottom = self.box
        return (left + (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * (right - left),
                bottom - (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0]) * (bottom - top))

    def frame(self, title, xlabel, ylabel, xticks, yticks):
        """Grid lines, frame, tick labels ((value, text) pairs; text may have two lines) and labels."""
        left, top, right, bottom = self.box
        for value, label in yticks:
            y = self.px(self.xlim[0], value)[1]
            self.draw.line([(left, y), (right, y)], fill=GRID)
            self.draw.text((left - 8, y), label, font=font(SMALL_SIZE), fill=INK, anchor="rm")
        for value, label in xticks:
            x = self.px(value, self.ylim[0])[0]
            self.draw.line([(x, bottom), (x, bottom + 5)], fill=MUTED)
            self.draw.multiline_text((x, bottom + 9), label, font=font(SMALL_SIZE), fill=INK, anchor="ma",
                                     align="center")
        self.draw.rectangle(self.box, outline=MUTED)
        self.draw.text((left, top - 52), title, font=font(TEXT_SIZE + 2), fill=INK)
        self.draw.text(((left + right) / 2, bottom + 50), xlabel, font=font(TEXT_SIZE), fill=INK, anchor="ma")
        vertical_text(self.image, (left - 62, (top + bottom) / 2), ylabel)

    def series(self, xs, ys, color, width=2, markers=False):
        """A line through the points whose y is not None (gaps are bridged), with optional markers."""
        points = [self.px(x, y) for x, y in zip(xs, ys) if y is not None]
        if len(points) > 1:
            self.draw.line(points, fill=color, width=width, joint="curve")
        if markers or len(points) == 1:
            for p in points:
                dot(self.draw, p, color, radius=4)


def value_ticks(lo, hi, pad=0.03, clip=(-math.inf, math.inf)):
    """(value, label) ticks covering [lo, hi] widened by `pad` of its span but kept within `clip`, and their limits."""
    span = pad * (hi - lo)  # so that no point or line sits on the frame
    values = nice_ticks(max(lo - span, clip[0]), min(hi + span, clip[1]))
    return [(v, f"{v:g}") for v in values], (values[0], values[-1])



BOX_H, BOX_GAP, CAPTION_H, PLUS_R = 30, 8, 22, 12  # op box height, gap between a block's ops, caption, "+" radius
COLUMN_GAP, ROW_GAP, VIA_H, MARGIN = 90, 26, 8, 24
CELL_NOTE = ("inputs: 0 = cell k-2, 1 = cell k-1, 2+i = block i  ·  a block adds its ops (a none half is not drawn)  ·  "
             "the cell concatenates the blocks no block reads")


class CellLayout:
    """Where each part of a cell's picture goes: item -> top, height of its output, column."""
    # Nodes stand in columns by depth (the two inputs first, the concat last). An edge longer than one column
    # passes a 'via' point in every column it crosses, so no line is drawn across a box. Items are ('node', n)
    # with n = 0, 1 (inputs), 2 + i (block i), len(cell) + 2 (concat), and ('via', n, column).

    def __init__(self, cell):
        self.cell, self.out = cell, len(cell) + 2
        self._place_columns()
        anchor = self._measure()
        self._stack_columns(anchor)
        self._place_lefts()
        self._place_ports()

    def _place_columns(self):
        """Each node's sources and depth, and the items of every column: nodes by depth, then vias."""
        out = self.out
        # a "none" half reads nothing and is not drawn; the concat takes the loose ends (blocks no block reads)
        self.real = {2 + i: [(s, op) for s, op in ((in1, op1), (in2, op2)) if op != "none"]
                     for i, (in1, op1, in2, op2) in enumerate(self.cell)}
        self.sources = {node: [s for s, _ in halves] for node, halves in self.real.items()}
        read = {s for srcs in self.sources.values() for s in srcs}
        self.loose = [node for node in range(2, out) if node not in read]
        self.sources[out] = self.loose
        self.depth = {0: 0, 1: 0}
        for node in range(2, out + 1):
            self.depth[node] = 1 + max(self.depth[s] for s in self.sources[node])
        self.columns = [[] for _ in range(self.depth[out] + 1)]
        for node in range(out + 1):
            self.columns[self.depth[node]].append(("node", node))
        for node, srcs in self.sources.items():
            for s in sorted(set(srcs)):
                for c in range(self.depth[s] + 1, self.depth[node]):
                    if ("via", s, c) not in self.columns[c]:
                        self.columns[c].append(("via", s, c))

    def _measure(self):
        """The width of an op box and the size of each kind of item; returns each kind's anchor."""
        n = len(self.cell)
        self.box_w = max(text_width(op) for block in self.cell for op in block[1::2]) + 24
        self.size = {"input": (text_width("0: cell k-2") + 24, 36), "out": (84, max(36, 22 * len(self.loose) + 8)),
                     "via": (0, VIA_H),
                     "block": (self.box_w + 36 + 2 * PLUS_R, CAPTION_H + 2 * BOX_H + BOX_GAP)}
        # anchor: how far below an item's top its output leaves it (and, for a block, the middle of its two inputs)
        return {"input": 18, "block": CAPTION_H + BOX_H + BOX_GAP / 2, "out": self.size["out"][1] / 2,
                "via": VIA_H / 2}

    def _stack_columns(self, anchor):
        """The top and output height of every item, column by column, then all moved down below the title."""
        self.top, self.y = {}, {}
        for c, items in enumerate(self.columns):
            self._stack_column(c, items, anchor)
        lift = MARGIN + 40 - min(self.top.values())
        self.top = {item: t + lift for item, t in self.top.items()}
        self.y = {item: t + lift for item, t in self.y.items()}

    def _stack_column(self, c, items, anchor):
        """The top and output height of column c's items, which it sorts by the height their inputs come from."""
        if c == 0:
            want = {item: k * (36 + ROW_GAP) + 18 for k, item in enumerate(items)}
        else:
            want = {item: sum(self.y[p] for p in self.feeds(item)) / len(self.feeds(item)) for item in items}
            items.sort(key=lambda item: (want[item], item[0] == "via", item[1]))
        # Stack the column in that order, each item as near as it can be to the height its inputs come from.
        tops, floor = [], -math.inf
        for item in items:
            tops.append(max(want[item] - anchor[self.kind(item)], floor))
            floor = tops[-1] + self.size[self.kind(item)][1] + (12 if item[0] == "via" else ROW_GAP)
        shift = sum(t + anchor[self.kind(i)] - want[i] for t, i in zip(tops, items)) / len(items)
        for t, item in zip(tops, items):
            self.top[item], self.y[item] = t - shift, t - shift + anchor[self.kind(item)]

    def _place_lefts(self):
        """The left edge of every column, and the picture's width and height."""
        self.lefts, x = [], MARGIN
        for items in self.columns:
            self.lefts.append(x)
            x += max(self.size[self.kind(i)][0] for i in items) + COLUMN_GAP
        self.width = x - COLUMN_GAP + 110 + MARGIN  # room for the output arrow and its label
        self.height = max(t + self.size[self.kind(i)][1] for i, t in self.top.items()) + MARGIN + 28

    def _place_ports(self):
        """Which op box of a block takes which input, and the height of every arrow into a block or the concat."""
        out = self.out
        self.halves, self.ports = {}, {}  # block -> [(source, op)] top to bottom; (source, node) -> arrow heights
        for node in range(2, out):
            c = self.depth[node]
            # The upper op box takes the input that arrives higher up, so the block's two edges do not cross.
            pair = sorted((self.y[self.feed(s, c)], k, s, op) for k, (s, op) in enumerate(self.real[node]))
            self.halves[node] = [(s, op) for _, _, s, op in pair]
            for k, (s, _) in enumerate(self.halves[node]):
                self.ports.setdefault((s, node), []).append(self.box_top(node, k) + BOX_H / 2)
        blocks = sorted(self.loose, key=lambda s: self.y[self.feed(s, self.depth[out])])
        for k, s in enumerate(blocks):
            self.ports[(s, out)] = [self.top[("node", out)] + (k + 0.5) * self.size["out"][1] / len(self.loose)]

    def box_top(self, node, k):
        """The top of block node's k-th op box; a block of one op (the other is "none") has its box in the middle."""
        middle = (BOX_H + BOX_GAP) / 2 if len(self.halves[node]) == 1 else 0
        return self.top[("node", node)] + CAPTION_H + k * (BOX_H + BOX_GAP) + middle

    def kind(self, item):
        """'input', 'block', 'out' or 'via'."""
        return "via" if item[0] == "via" else "input" if item[1] < 2 else "out" if item[1] == self.out else "block"

    def feed(self, s, c):
        """The item of column c - 1 that carries node s's output into column c."""
        return ("node", s) if self.depth[s] == c - 1 else ("via", s, c - 1)

    def feeds(self, item):
        """The items of the previous column that an item takes its inputs from."""
        c = self.depth[item[1]] if item[0] == "node" else item[2]
        return [self.feed(s, c) for s in (self.sources[item[1]] if item[0] == "node" else [item[1]])]

    def right(self, c):
        """Where edges leave column c: its right edge, so that they never cross a box of the column."""
        return self.lefts[c] + max(self.size[self.kind(i)][0] for i in self.columns[c])


def curve(draw, start, end, color):
    """A cubic Bezier from `start` to `end` leaving and arriving horizontally."""
    (x1, y1), (x2, y2) = start, end
    bend = (x2 - x1) / 2
    points = []
    for k in range(33):
        t = k / 32
        a, b, c, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
        points.append((a * x1 + b * (x1 + bend) + c * (x2 - bend) + d * x2, (a + b) * y1 + (c + d) * y2))
    draw.line(points, fill=color, width=2, joint="curve")


def arrow(draw, tip, color):
    """An arrowhead pointing right with its tip at `tip`."""
    x, y = tip
    draw.polygon([(x, y), (x - 10, y - 5), (x - 10, y + 5)], fill=color)


def draw_cell(cell, path, title=None):
    """best_cell.png or --draw: the cell as a graph, each op a labelled box, edges coloured by the node they leave."""
    g = CellLayout([tuple(block) for block in cell])
    title = title or f"cell with {len(cell)} block{'s' if len(cell) > 1 else ''}"
    width = max(g.width, text_width(title, TITLE_SIZE) + 2 * MARGIN, text_width(CELL_NOTE, SMALL_SIZE) + 2 * MARGIN)
    image = Image.new("RGB", (int(width), int(g.height)), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN - 6), title, font=font(TITLE_SIZE), fill=INK)
    draw.text((MARGIN, g.height - MARGIN - 14), CELL_NOTE, font=font(SMALL_SIZE), fill=MUTED)
    # Edges first: the boxes are drawn over their ends.
    draw_edges(draw, g)
    draw_inputs(draw, g)
    for node in range(2, g.out):
        draw_block(draw, g, node)
    draw_concat(draw, g)
    save_png(image, path)


def draw_edges(draw, g):
    """Every edge of layout `g`: out of its source, through a via in each column it crosses, to an arrowhead."""
    for (s, node), arrow_ys in g.ports.items():
        color, c, y = PALETTE[s % len(PALETTE)], g.depth[s], g.y[("node", s)]
        draw.line([(g.lefts[c] + g.size[g.kind(("node", s))][0], y), (g.right(c), y)], fill=color, width=2)
        for via in range(c + 1, g.depth[node]):
            curve(draw, (g.right(via - 1), y), (g.lefts[via], g.y[("via", s, via)]), color)
            y = g.y[("via", s, via)]
            draw.line([(g.lefts[via], y), (g.right(via), y)], fill=color, width=2)
        end = g.lefts[g.depth[node]]
        for arrow_y in arrow_ys:
            curve(draw, (g.right(g.depth[node] - 1), y), (end - 9, arrow_y), color)
            arrow(draw, (end, arrow_y), color)


def draw_inputs(draw, g):
    """The cell's two input boxes, greyed out where no block uses them."""
    for node in (0, 1):
        used = any(s == node for s, _ in g.ports)
        box = [g.lefts[0], g.top[("node", node)], g.lefts[0] + g.size["input"][0], g.top[("node", node)] + 36]
        draw.rounded_rectangle(box, 6, fill=(242, 242, 242), outline=INK if used else MUTED)
        draw.text(((box[0] + box[2]) / 2, box[1] + 18), f"{node}: cell k-{2 - node}", font=font(TEXT_SIZE),
                  fill=INK if used else MUTED, anchor="mm")


def draw_block(draw, g, node):
    """Block node - 2: its caption, its op boxes (one where the other half is "none") and the '+' that adds two."""
    x, top = g.lefts[g.depth[node]], g.top[("node", node)]
    draw.text((x, top), f"{node}: block {node - 2}", font=font(SMALL_SIZE), fill=PALETTE[node % len(PALETTE)])
    plus_x, plus_y = x + g.box_w + 36 + PLUS_R, g.y[("node", node)]
    for k, (_, op) in enumerate(g.halves[node]):
        box_top = g.box_top(node, k)
        end = (plus_x, plus_y) if len(g.halves[node]) == 2 else (plus_x + PLUS_R, plus_y)  # to the '+', or out
        draw.line([(x + g.box_w, box_top + BOX_H / 2), end], fill=INK, width=2)
        draw.rounded_rectangle([x, box_top, x + g.box_w, box_top + BOX_H], 5, fill=OP_FILL.get(op, GRID),
                               outline=INK)
        draw.text((x + g.box_w / 2, box_top + BOX_H / 2), op, font=font(TEXT_SIZE), fill=INK, anchor="mm")
    if len(g.halves[node]) == 2:
        draw.circle((plus_x, plus_y), PLUS_R, fill=WHITE, outline=INK, width=2)
        draw.text((plus_x, plus_y - 1), "+", font=font(TITLE_SIZE), fill=INK, anchor="mm")


def draw_concat(draw, g):
    """The concat box in the last column and the arrow out of it to the cell's output."""
    x, top = g.lefts[-1], g.top[("node", g.out)]
    box = [x, top, x + g.size["out"][0], top + g.size["out"][1]]
    draw.rounded_rectangle(box, 6, fill=(242, 242, 242), outline=INK)
    mid = (box[1] + box[3]) / 2
    draw.text(((box[0] + box[2]) / 2, mid), "concat", font=font(TEXT_SIZE), fill=INK, anchor="mm")
    draw.line([(box[2], mid), (box[2] + 40, mid)], fill=INK, width=2)
    arrow(draw, (box[2] + 44, mid), INK)


def save_png(image, path):
    """Write `image` as a PNG atomically: a kill mid-write leaves the previous picture, never half of one."""
    atomic_write(path, lambda f: image.save(f, format="PNG"))
