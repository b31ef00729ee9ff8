"""Few-shot image data: load train/val/test splits and sample N-way K-shot episodes.

A source is either 'synthetic' (built-in glyph classes, no disk needed) or a folder in one of
these layouts, detected from what the folder holds (`validation` is accepted for `val`):

  csv      images/*.jpg plus train.csv, val.csv, test.csv with header `filename,label`
           (the Ravi & Larochelle Mini-ImageNet split)
  pickle   mini-imagenet-cache-{train,val,test}.pkl, each a dict with `image_data`
           (N, H, W, 3) uint8 and `class_dict` (class name -> list of row indices)
  folders  train/<class>/<image>, val/<class>/<image>, test/<class>/<image> (Omniglot-style)

Every image is converted to RGB and resized to image_size x image_size once; each decoded split
is cached as an .npz in cache_dir when one is given (the command line's: --cache-dir, by default
cache/ beside --out), keyed by its source files and size.
"""
import csv
import hashlib
import os
import pickle
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from files import atomic_write, writing

SPLITS = ('train', 'val', 'test')
SPLIT_NAMES = {'train': ('train',), 'val': ('val', 'validation'), 'test': ('test',)}  # accepted file names
SYNTHETIC_CLASSES = {'train': 64, 'val': 16, 'test': 20}
SYNTHETIC_IMAGES_PER_CLASS = 20
LAYOUTS = ('images/ plus train.csv, val.csv, test.csv; mini-imagenet-cache-{train,val,test}.pkl; '
           'or train/, val/, test/ folders of class folders')


class DataError(ValueError):
    """Bad dataset input; message is one clear sentence naming the problem and the fix."""


@dataclass
class Split:
    """One split of a few-shot dataset: every image with its class label."""
    name: str              # 'train', 'val' or 'test'
    classes: list[str]     # class names, index = label
    images: np.ndarray     # (N, H, W, 3) uint8
    labels: np.ndarray     # (N,) int64, values in range(len(classes))


def cache_dir(cfg) -> str:
    """Where a run with Config `cfg` caches decoded splits: --cache-dir, or by default cache/ beside --out."""
    return cfg.cache_dir or os.path.join(os.path.dirname(os.path.abspath(cfg.out)), 'cache')


def splits_for(cfg, needed=SPLITS) -> dict[str, Split]:
    """The splits a run with Config `cfg` reads (cached in cache_dir(cfg)), each checked to give its episodes."""
    splits = load_splits(cfg.data, cfg.image_size, cache_dir(cfg), seed=cfg.seed)
    for name in needed:
        check_split(splits[name], cfg.ways, cfg.shots, cfg.queries)
    return splits


def default_image_size(source: str) -> int:
    """Side length used when none is given: 28 for synthetic glyphs, 84 for photos."""
    return 28 if source == 'synthetic' else 84


def load_splits(source: str, image_size: int | None = None, cache_dir: str | None = None,
                seed: int = 0) -> dict[str, Split]:
    """Load {'train', 'val', 'test'} from 'synthetic' (drawn from seed) or a folder in a supported layout,
    through the .npz cache in `cache_dir` (None: decode every time, cache nothing)."""
    image_size = image_size or default_image_size(source)
    if source == 'synthetic':
        return synthetic_splits(image_size, seed)
    root = Path(source).expanduser().resolve()
    if not root.is_dir():
        problem = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"data folder {source} {problem}: pass --data synthetic or a folder in "
                        f"one of the supported layouts ({LAYOUTS})")
    layout = detect_layout(root)
    cache = Path(cache_dir).expanduser() if cache_dir else None
    return {name: _load_split(root, layout, name, image_size, cache) for name in SPLITS}


def describe(splits: dict[str, Split]) -> list[str]:
    """One line per split: '<split>: <C> classes, <I> images, <H>x<W>'."""
    return [f"{name}: {len(splits[name].classes)} classes, {len(splits[name].images)} images, "
            f"{splits[name].images.shape[1]}x{splits[name].images.shape[2]}" for name in SPLITS]


def check_split(split: Split, ways: int, shots: int, queries: int) -> None:
    """Raise DataError unless every episode of ways x (shots + queries) images can be drawn from split."""
    if min(ways, shots, queries) < 1:
        raise DataError(f"ways, shots and queries must be at least 1, got {ways}, {shots}, {queries}: "
                        "pass positive --ways, --shots and --queries")
    if len(split.classes) < ways:
        raise DataError(f"the {split.name} split has {len(split.classes)} classes but {ways}-way episodes "
                        f"need {ways}: lower --ways to at most {len(split.classes)}")
    counts = np.bincount(split.labels, minlength=len(split.classes))
    smallest = int(counts.argmin())
    if counts[smallest] < shots + queries:
        raise DataError(f"class {split.classes[smallest]} of the {split.name} split has {counts[smallest]} "
                        f"images but shots + queries = {shots} + {queries} = {shots + queries}: lower "
                        f"--shots or --queries so they sum to at most {counts[smallest]}")


# ---------------------------------------------------------------------------- episodes

class EpisodeSampler:
    """Draws batches of N-way K-shot tasks (support + Q queries per class) from one split."""

    def __init__(self, split: Split, ways: int, shots: int, queries: int, seed: int):
        check_split(split, ways, shots, queries)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.rng = np.random.default_rng(seed)
        self.by_class = [np.flatnonzero(split.labels == c) for c in range(len(split.classes))]
        # a (N, 3, H, W) view of the uint8 array, no copy; each image stays contiguous for fast gathers
        self.images = torch.from_numpy(split.images).permute(0, 3, 1, 2)

    def sample_indices(self, n_tasks: int) -> tuple[np.ndarray, np.ndarray]:
        """Image indices of n_tasks episodes: support (T, N*K) and query (T, N*Q), class-major."""
        idx = np.empty((n_tasks, self.ways, self.shots + self.queries), dtype=np.int64)
        for t in range(n_tasks):
            # classes in random order: the class drawn i-th gets label i
            for label, c in enumerate(self.rng.choice(len(self.by_class), self.ways, replace=False)):
                # without replacement, so support and query never share an image
                idx[t, label] = self.rng.choice(self.by_class[c], self.shots + self.queries, replace=False)
        support = idx[:, :, :self.shots].reshape(n_tasks, -1)  # (T, N*K)
        query = idx[:, :, self.shots:].reshape(n_tasks, -1)  # (T, N*Q)
        return support, query

    def gather(self, support: np.ndarray, query: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Turn index arrays from sample_indices into (xs, ys, xq, yq) tensors."""
        n_tasks = len(support)
        ys = torch.arange(self.ways).repeat_interleave(self.shots).expand(n_tasks, -1)  # (T, N*K)
        yq = torch.arange(self.ways).repeat_interleave(self.queries).expand(n_tasks, -1)  # (T, N*Q)
        return self._pixels(support), ys.contiguous(), self._pixels(query), yq.contiguous()

    def sample(self, n_tasks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """xs (T, N*K, 3, H, W) float in [0, 1], ys (T, N*K) int64, xq (T, N*Q, 3, H, W), yq (T, N*Q)."""
        return self.gather(*self.sample_indices(n_tasks))

    def _pixels(self, idx: np.ndarray) -> torch.Tensor:
        """(T, M) indices -> (T, M, 3, H, W) float32 in [0, 1]; only these images are converted."""
        return self.images[torch.from_numpy(idx)].contiguous().float().div_(255)


class FixedEpisodes(Sequence):
    """A fixed, seeded list of task batches; stores indices only and gathers pixels on access."""

    def __init__(self, sampler: EpisodeSampler, n_episodes: int, batch: int):
        self.sampler = sampler
        sizes = [min(batch, n_episodes - start) for start in range(0, n_episodes, batch)]
        self.indices = [sampler.sample_indices(size) for size in sizes]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.sampler.gather(*self.indices[i])


def fixed_episodes(split: Split, ways: int, shots: int, queries: int, n_episodes: int, seed: int,
                   batch: int = 1) -> FixedEpisodes:
    """The same n_episodes tasks on every call with this seed, `batch` tasks per item (the last: fewer)."""
    return FixedEpisodes(EpisodeSampler(split, ways, shots, queries, seed), n_episodes, batch)


# ---------------------------------------------------------------------------- synthetic glyphs

def synthetic_splits(image_size: int, seed: int) -> dict[str, Split]:
    """64/16/20 disjoint classes of random glyphs, 20 jittered renderings each, all from seed."""
    rng = np.random.default_rng(seed)
    splits, first = {}, 0
    for name in SPLITS:
        n_classes = SYNTHETIC_CLASSES[name]
        glyphs = [_glyph(rng) for _ in range(n_classes)]
        images = np.stack([_render(g, image_size, rng) for g in glyphs
                           for _ in range(SYNTHETIC_IMAGES_PER_CLASS)])  # (C*20, H, W, 3)
        noise = rng.normal(0, 6, images.shape)  # a little sensor noise
        images = np.clip(images + noise, 0, 255).astype(np.uint8)
        labels = np.repeat(np.arange(n_classes), SYNTHETIC_IMAGES_PER_CLASS)
        classes = [f'glyph{first + c:03d}' for c in range(n_classes)]
        splits[name] = Split(name, classes, images, labels)
        first += n_classes
    return splits


def _glyph(rng: np.random.Generator) -> list[np.ndarray]:
    """A class: 2-4 strokes, each a (P, 2) polyline in [-1, 1]^2, either a straight line or an arc."""
    strokes = []
    for _ in range(rng.integers(2, 5)):
        if rng.random() < 0.5:
            strokes.append(rng.uniform(-0.8, 0.8, size=(2, 2)))
        else:
            center, radius = rng.uniform(-0.4, 0.4, size=2), rng.uniform(0.25, 0.6)
            angles = rng.uniform(0, 2 * np.pi) + np.linspace(0, rng.uniform(0.5, 1.5) * np.pi, 8)
            strokes.append(center + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1))
    return strokes


def _render(strokes: list[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """One jittered rendering of a glyph: (size, size, 3) uint8, drawn at 4x and downsampled."""
    hi = 4 * size
    angle = rng.uniform(-0.35, 0.35)  # radians, about +-20 degrees
    rotate = rng.uniform(0.8, 1.15) * np.array([[np.cos(angle), -np.sin(angle)],
                                                 [np.sin(angle), np.cos(angle)]])
    shift = rng.uniform(-0.15, 0.15, size=2)
    width = max(1, round(rng.uniform(0.06, 0.11) * hi))
    ink = tuple(int(v) for v in rng.integers(150, 256, size=3))
    image = Image.new('RGB', (hi, hi), (int(rng.integers(0, 60)),) * 3)
    draw = ImageDraw.Draw(image)
    for points in strokes:
        moved = points + rng.normal(0, 0.06, size=2) + rng.normal(0, 0.025, size=points.shape)
        xy = ((moved @ rotate.T + shift) * 0.85 + 1) * hi / 2  # (P, 2) pixel coordinates
        draw.line([tuple(p) for p in xy], fill=ink, width=width, joint='curve')
    return np.asarray(image.reduce(4))  # 4x4 box average: antialiased strokes


# ---------------------------------------------------------------------------- folders on disk

def detect_layout(root: Path) -> str:
    """'csv', 'pickle' or 'folders', from the files in root; DataError if none matches."""
    if (root / 'images').is_dir() and all(_find(root, '{}.csv', name) for name in SPLITS):
        return 'csv'
    if all(_find(root, 'mini-imagenet-cache-{}.pkl', name) for name in SPLITS):
        return 'pickle'
    folders = [_find(root, '{}', name) for name in SPLITS]
    if all(folder and folder.is_dir() for folder in folders):
        return 'folders'
    raise DataError(f"data folder {root} matches no supported layout ({LAYOUTS}): arrange it in one "
                    "of them or pass --data synthetic")


def _find(root: Path, pattern: str, name: str) -> Path | None:
    """The existing path root/pattern for split name (trying 'validation' for 'val'), or None."""
    paths = [root / pattern.format(alias) for alias in SPLIT_NAMES[name]]
    return next((p for p in paths if p.exists()), None)


def _load_split(root: Path, layout: str, name: str, image_size: int, cache_dir: Path | None) -> Split:
    """One split, read from the .npz cache when its key matches, otherwise decoded (and cached, with a cache_dir)."""
    if layout == 'pickle':
        sources = [(_find(root, 'mini-imagenet-cache-{}.pkl', name), '')]
    else:
        sources = _list_csv(root, name) if layout == 'csv' else _list_folders(root, name)
    # the key changes when any source file, its class, the layout or the image size changes
    stats = [(p.name, c, st.st_size, st.st_mtime_ns) for p, c in sources for st in [os.stat(p)]]
    key = hashlib.sha1(repr((str(root), layout, name, image_size, stats)).encode()).hexdigest()
    path = cache_dir / f'{layout}-{name}-{image_size}px-{key[:16]}.npz' if cache_dir else None
    split = _read_cache(path, name) if path else None
    if split is None:
        if layout == 'pickle':
            split = _read_pickle(sources[0][0], name, image_size)
        else:
            split = _decode(sources, name, image_size)
        if path:
            _write_cache(path, split)
    return split


def _list_csv(root: Path, name: str) -> list[tuple[Path, str]]:
    """(image path, class) for every row of root/<name>.csv (header filename,label)."""
    path = _find(root, '{}.csv', name)
    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ['filename', 'label']:
        raise DataError(f"{path} must start with the header 'filename,label': fix the file's first line")
    if len(rows) == 1:
        raise DataError(f"{path} lists no images: add 'filename,label' rows")
    sources, folder = [], root / 'images'
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise DataError(f"line {line} of {path} is not 'filename,label': fix or remove it")
        image = folder / row[0]
        if not image.is_file():
            raise DataError(f"image {image} listed in {path} does not exist: add it to {folder} "
                            "or remove its row")
        sources.append((image, row[1]))
    return sources


def _list_folders(root: Path, name: str) -> list[tuple[Path, str]]:
    """(image path, class) for every file in root/<name>/<class>/, classes and files sorted by name."""
    sources = []
    for folder in sorted(p for p in _find(root, '{}', name).iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith('.'))
        if not files:
            raise DataError(f"class folder {folder} holds no images: add images or remove the folder")
        sources += [(p, folder.name) for p in files]
    if not sources:
        raise DataError(f"split folder {_find(root, '{}', name)} holds no class folders: add one folder "
                        "of images per class")
    return sources


def _decode(sources: list[tuple[Path, str]], name: str, image_size: int) -> Split:
    """Decode every (image path, class) into a Split; classes sorted by name."""
    classes = sorted({c for _, c in sources})
    label_of = {c: i for i, c in enumerate(classes)}
    paths = [p for p, _ in sources]
    pool = ThreadPoolExecutor()  # PIL releases the GIL while decoding
    try:
        images = np.stack(list(pool.map(_read_image, paths, [image_size] * len(paths))))  # (N, H, W, 3)
    finally:
        pool.shutdown(cancel_futures=True)  # stop early when one file is broken
    labels = np.array([label_of[c] for _, c in sources], dtype=np.int64)
    return Split(name, classes, images, labels)


def _read_image(path: Path, image_size: int) -> np.ndarray:
    """Fully decode one image file into (image_size, image_size, 3) uint8."""
    try:
        with Image.open(path) as image:
            image = image.convert('RGB')  # forces the full decode, so truncated files fail here
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({e}): replace or remove the file") from e
    return _resize(image, image_size)


def _resize(image: Image.Image, image_size: int) -> np.ndarray:
    """Square-resize a PIL image (no crop, as in the Ravi & Larochelle split) to (S, S, 3) uint8."""
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def _read_pickle(path: Path, name: str, image_size: int) -> Split:
    """A Split from a pickled dict with image_data (N, H, W, 3) and class_dict; only load trusted files."""
    with open(path, 'rb') as f:
        try:
            data = pickle.load(f)
        except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as e:
            raise DataError(f"cannot unpickle {path} ({e}): replace the file") from e
    if not (isinstance(data, dict) and {'image_data', 'class_dict'} <= data.keys() and data['class_dict']):
        raise DataError(f"{path} must hold a dict with keys 'image_data' and a non-empty 'class_dict': "
                        "use the mini-imagenet-cache pickles or another layout")
    images = np.asarray(data['image_data'])
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise DataError(f"image_data in {path} has shape {images.shape} and dtype {images.dtype}: "
                        "it must be (N, H, W, 3) uint8")
    classes = sorted(data['class_dict'])
    rows = [np.asarray(data['class_dict'][c], dtype=np.int64) for c in classes]
    labels = np.concatenate([np.full(len(r), i, dtype=np.int64) for i, r in enumerate(rows)])
    images = images[np.concatenate(rows)]  # (N, H, W, 3), grouped by class
    if images.shape[1:3] != (image_size, image_size):
        images = np.stack([_resize(Image.fromarray(im), image_size) for im in images])
    return Split(name, classes, images, labels)


def _read_cache(path: Path, name: str) -> Split | None:
    """The cached Split at path, or None when it is missing or unreadable (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return Split(name, [str(c) for c in f['classes']], f['images'], f['labels'])
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None


def _write_cache(path: Path, split: Split) -> None:
    """Write split to path atomically, so a kill never leaves half a cache file; a failure to write
    is a FolderError naming the file and the fix."""
    with writing(path.parent, '--cache-dir'):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, images=split.images, labels=split.labels,
                                              classes=np.array(split.classes)))
