"""episodes: fixed test episodes read from folders, scored one by one (``data=episodes``).

A published fixed test set (such as the 20 runs of Lake et al.'s 20-way one-shot task) is
scored exactly: every episode once, in sorted order, with the support and query images
it lists. The layout under ``path`` (absolute, or relative to where metalearn is started)::

    path/<episode>/<class>/support/*.png
    path/<episode>/<class>/query/*.png

Episodes are the subfolders of ``path``, classes the subfolders of an episode, both taken
in sorted name order; an episode's classes get the labels 0..N-1 in that order. Images
are the files ending in .png, .jpg, .jpeg, .bmp, .gif or .webp (any case); names starting
with "." or "__" are skipped, and so are other files and folders beside the class folders
or beside ``support/`` and ``query/``. Episodes may differ in ways and shots. Within an
episode every class has the same number of support images (the shots; several
algorithms reshape the support set by class), while query counts may differ from class
to class: an episode's accuracy is the fraction of its query images classified
correctly, as Lake et al. score a run. Episodes of different shapes are evaluated in
separate batches.

Images are decoded with imagefolder's decoder (Pillow, greyscale or RGB, resized to
``image_size`` x ``image_size`` with BILINEAR, optionally inverted). ``image_size`` and
``channels`` left null take the input shape of the checkpoint being evaluated. Inputs are
scaled and normalised as the run's own inputs were (``metalearn eval`` applies the
checkpoint's normalisation), so this dataset has no ``normalize`` option. There is no
training split: ``metalearn train data=episodes`` is refused. Nothing is cached: the
files are decoded on every evaluation (thousands of images a second).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from metalearn.data.episodes import TaskBatch, Transform
from metalearn.data.imagefolder import IMAGE_EXTENSIONS, decode
from metalearn.data.images import decode_many
from metalearn.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SETS = ("support", "query")
LAYOUT = "<path>/<episode>/<class>/support/*.png and <path>/<episode>/<class>/query/*.png"


@dataclass
class Config:
    name: str = "episodes"
    path: str = ""  # the folder of episode folders; made absolute when the config is built
    image_size: Optional[int] = None  # pixels per side; null: the checkpoint's (metalearn eval fills it in)
    channels: Optional[int] = None  # 1: greyscale, 3: RGB; null: the checkpoint's
    invert: bool = False  # 255 - x after decoding: dark ink on white (Lake's Omniglot PNGs) becomes ink = 255

    def __post_init__(self):
        if self.path:  # as imagefolder: relative to where metalearn was started, recorded absolute
            self.path = _absolute(self.path)


@dataclass
class Episode:
    """One fixed episode: uint8 images sorted by label, the labels 0..N-1, and the names behind them."""

    name: str
    class_names: list[str]
    support_x: torch.Tensor  # [n_s, C, H, W] uint8
    support_y: torch.Tensor  # [n_s]
    query_x: torch.Tensor  # [n_q, C, H, W]
    query_y: torch.Tensor  # [n_q]

    @property
    def ways(self) -> int:
        return len(self.class_names)

    @property
    def shots(self) -> int:
        return len(self.support_y) // self.ways

    @property
    def queries(self) -> list[int]:
        """Query images of each class."""
        return torch.bincount(self.query_y, minlength=self.ways).tolist()


class EpisodeSet:
    """A task source of fixed episodes: its sampler gives them in order, one per ``sample()``, each once.

    It has what ``engine.evaluate`` uses of a ClassStore (``task``, ``input_shape``, ``num_classes``,
    ``sampler``, ``to``, the transforms); ``num_classes`` counts every class of every episode.
    """

    task = "classification"

    def __init__(self, episodes: list[Episode], folder: Path):
        self.episodes, self.folder = episodes, folder
        self.train_transform: Transform | None = None
        self.eval_transform: Transform | None = None
        self.mean = self.std = None  # the normalisation is the checkpoint's (see the module docstring)

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @property
    def num_classes(self) -> int:
        return sum(e.ways for e in self.episodes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.episodes[0].support_x.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.episodes[0].support_x.device

    def __len__(self) -> int:
        return sum(len(e.support_y) + len(e.query_y) for e in self.episodes)

    def to(self, device: torch.device | str) -> "EpisodeSet":
        for e in self.episodes:
            e.support_x, e.support_y = e.support_x.to(device), e.support_y.to(device)
            e.query_x, e.query_y = e.query_x.to(device), e.query_y.to(device)
        return self

    def shapes(self) -> list[tuple[int, int, int]]:
        """The distinct (ways, shots, fewest queries of a class) of the episodes, in first-seen order."""
        return list(dict.fromkeys((e.ways, e.shots, min(e.queries)) for e in self.episodes))

    def summary(self) -> dict:
        """The episode shape for results: numbers where every episode agrees, "lo-hi" ranges where not."""
        def span(values: list[int]) -> int | str:
            lo, hi = min(values), max(values)
            return lo if lo == hi else f"{lo}-{hi}"

        return {"ways": span([e.ways for e in self.episodes]), "shots": span([e.shots for e in self.episodes]),
                "queries": span([q for e in self.episodes for q in e.queries]), "task": self.task,
                "fixed": str(self.folder), "episodes": self.num_episodes}

    def check_episode(self, split: str, ways: int, shots: int, queries: int) -> None:
        """Nothing to check: the shapes are those of the folders (``metalearn eval`` refuses ways= and the like)."""

    def sampler(self, ways: int, shots: int, queries: int, batch_size: int, seed: int,
                training: bool = False) -> "FixedEpisodeSampler":
        """The episodes in order; ``ways``, ``shots``, ``queries`` and ``batch_size`` are the folders' own."""
        return FixedEpisodeSampler(self, seed, self.train_transform if training else self.eval_transform)


class FixedEpisodeSampler:
    """Gives the episodes of an EpisodeSet in sorted order, one task per ``sample()``, each exactly once.

    The images of each set are shuffled (from ``seed``) so that their order carries no label, as the
    random sampler does: sequence learners (SNAIL, MANN) read the support set in order.
    """

    def __init__(self, episodes: EpisodeSet, seed: int, transform: Transform | None):
        self.episodes, self.transform, self.next = episodes, transform, 0
        self.generator = torch.Generator(device=episodes.device)
        self.generator.manual_seed(seed)
        self.first_class = 0

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "next": self.next, "first_class": self.first_class}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.next, self.first_class = state["next"], state["first_class"]

    def sample(self) -> TaskBatch:
        if self.next >= self.episodes.num_episodes:
            raise IndexError(f"all {self.episodes.num_episodes} fixed episodes were given already")
        e, g = self.episodes.episodes[self.next], self.generator
        self.next += 1
        sp = torch.randperm(len(e.support_y), generator=g, device=g.device)
        qp = torch.randperm(len(e.query_y), generator=g, device=g.device)
        sx, qx = e.support_x[sp][None], e.query_x[qp][None]
        classes = torch.arange(self.first_class, self.first_class + e.ways, device=sx.device)[None]
        self.first_class += e.ways  # every class of every episode has its own index (the split's "class")
        if self.transform is None:
            sx, qx = sx.float().div_(255.0), qx.float().div_(255.0)
        else:
            sx, qx = self.transform(sx, g), self.transform(qx, g)
        return TaskBatch(sx, e.support_y[sp][None], qx, e.query_y[qp][None], classes)


def load(cfg: Config) -> dict[str, EpisodeSet]:
    folder = _check_config(cfg)
    listed = _find_episodes(folder)
    # Decoded in the order they are taken below: per episode, the support images of every class, then the queries.
    files = [p for _, classes in listed for s in SETS for sets in classes.values() for p in sets[s]]
    images = iter(_decode_all(files, cfg.image_size, cfg.channels, cfg.invert))
    episodes = []
    for name, classes in listed:
        parts = {s: [torch.stack([next(images) for _ in sets[s]]) for sets in classes.values()] for s in SETS}
        labels = {s: torch.arange(len(classes)).repeat_interleave(torch.tensor([len(x) for x in parts[s]])) for s in SETS}
        episodes.append(Episode(name, list(classes), torch.cat(parts["support"]), labels["support"],
                                torch.cat(parts["query"]), labels["query"]))
    store = EpisodeSet(episodes, folder)
    log.info("%d fixed episodes under %s (%s)", store.num_episodes, folder,
             ", ".join(f"{w}-way {s}-shot" for w, s, _ in store.shapes()))
    return {"test": store}


def cache_dir(cfg: Config) -> None:
    """None: nothing is cached (``metalearn data info`` prints no cache line)."""
    return None


def sources(cfg: Config) -> list[Path]:
    """The folder the loader reads."""
    return [Path(_absolute(cfg.path))] if cfg.path else []


# ---------------------------------------------------------------- pieces


def _absolute(path: str) -> str:
    """``path`` with ~ expanded, relative to Hydra's original working directory when Hydra runs."""
    from hydra.utils import to_absolute_path

    return os.path.normpath(to_absolute_path(os.path.expanduser(path)))


def _check_config(cfg: Config) -> Path:
    if not cfg.path:
        raise ConfigError(f"data.path is not set; give the folder of fixed episodes ({LAYOUT}), e.g. data.path=~/data/episodes")
    if cfg.image_size is None or cfg.channels is None:
        raise ConfigError("data.image_size and data.channels are not set; give them (e.g. data.image_size=28 "
                          "data.channels=1), or leave them null under metalearn eval, which takes the checkpoint's")
    if cfg.image_size < 1:
        raise ConfigError(f"data.image_size must be >= 1 (got {cfg.image_size})")
    if cfg.channels not in (1, 3):
        raise ConfigError(f"data.channels must be 1 (greyscale) or 3 (RGB) (got {cfg.channels})")
    folder = Path(cfg.path)
    if not folder.is_dir():
        raise DataError(f"data.path {folder} is not a folder; give the folder of fixed episodes ({LAYOUT}; "
                        "a relative path is taken from the directory metalearn was started in)")
    return folder


def _entries(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if not p.name.startswith((".", "__")))
    except OSError as e:
        raise DataError(f"cannot list {directory} ({e}); make it readable") from None


def _find_episodes(folder: Path) -> list[tuple[str, dict[str, dict[str, list[Path]]]]]:
    """[(episode name, {class name: {"support": files, "query": files}})], every name sorted; checked."""
    episode_dirs = [p for p in _entries(folder) if p.is_dir()]
    if not episode_dirs:
        raise DataError(f"no episode folders under {folder}; the layout is {LAYOUT}")
    listed = []
    for episode in episode_dirs:
        class_dirs = [p for p in _entries(episode) if p.is_dir()]
        if len(class_dirs) < 2:
            what = "is empty" if not class_dirs else f"has one class folder ({class_dirs[0].name})"
            raise DataError(f"episode {episode} {what}; an episode needs two or more class folders, "
                            f"each with support/ and query/ images ({LAYOUT})")
        classes = {}
        for c in class_dirs:
            sets = {}
            for s in SETS:
                images = [p for p in _entries(c / s) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()] \
                    if (c / s).is_dir() else []
                if not images:
                    raise DataError(f"class folder {c} has no {s} images (no {s}/ folder, or no "
                                    f"{', '.join(IMAGE_EXTENSIONS)} files in it); the layout is {LAYOUT}")
                sets[s] = images
            classes[c.name] = sets
        shots = {name: len(sets["support"]) for name, sets in classes.items()}
        if len(set(shots.values())) > 1:
            shown = ", ".join(f"{name} {n}" for name, n in shots.items())
            raise DataError(f"the classes of episode {episode} have different numbers of support images ({shown}); "
                            "give every class of an episode the same number (the shots)")
        listed.append((episode.name, classes))
    return listed


def _decode_all(paths: list[Path], size: int, channels: int, invert: bool) -> list[torch.Tensor]:
    """Each file as uint8 [C, H, W], decoded by imagefolder's decoder on threads, in order."""
    return list(decode_many(lambda path: decode(path, size, channels, invert), paths))
