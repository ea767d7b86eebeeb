"""Class-indexed image stores and the episode sampler.

A split is one uint8 tensor sorted by class: in memory, on the accelerator,
or memory-mapped from a cache file (tieredImageNet), in which case only the
images an episode draws are read. An episode batch is drawn with a handful of
vectorised tensor ops: no Python loop over tasks or classes, no DataLoader
workers, nothing that syncs with the host.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from metalearn.errors import DataError


#: uint8 images [..., C, H, W] and the sampler's generator -> float images [..., C, H, W]
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class TaskBatch:
    """A batch of few-shot tasks.

    support_x: [B, ways*shots, C, H, W] float; support_y: [B, ways*shots] labels 0..ways-1
    query_x:   [B, ways*queries, C, H, W];      query_y:   [B, ways*queries]
    classes:   [B, ways], the split's class index behind each label
               (label i of task b is class classes[b, i]), for algorithms that
               pre-train on global labels.
    Examples are shuffled within each set, so the order carries no label.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def ways(self) -> int:
        return self.classes.shape[1]

    def to(self, device: torch.device | str) -> "TaskBatch":
        return self._with(*(getattr(self, f.name).to(device, non_blocking=True) for f in fields(TaskBatch)))

    @staticmethod
    def cat(batches: list["TaskBatch"]) -> "TaskBatch":
        """Concatenate batches of tasks along the task dimension."""
        return batches[0]._with(*(torch.cat([getattr(b, f.name) for b in batches]) for f in fields(TaskBatch)))

    def __getitem__(self, index) -> "TaskBatch":
        """Select tasks along the batch dimension (keeps the dimension for slices)."""
        return self._with(*(getattr(self, f.name)[index] for f in fields(TaskBatch)))

    def _with(self, *tensors: torch.Tensor) -> "TaskBatch":
        """A batch of this kind holding ``tensors`` (a subclass keeps what it carries besides them:
        data/environments.py's ``EnvTasks`` its environment)."""
        return TaskBatch(*tensors)


class ClassStore:
    """The images of one split, grouped by class: the task source of classification datasets.

    images[offsets[c] : offsets[c] + counts[c]] are the images of class c.
    ``mean``/``std`` are the dataset's per-channel statistics on the [0, 1] scale, used
    when the run normalises its inputs (``data.normalize``). Images already sorted by
    class are kept as given, not copied, so a memory-mapped array stays on disk and
    only the images an episode draws are read.

    Every task source (this, or a regression task generator such as ``sinusoid``) has
    ``task``, ``input_shape``, ``num_classes``, ``check_episode``, ``sampler`` and ``to``.

    Rotations as classes (``rotate_classes``) are lazy: each stored class c becomes classes 4c..4c+3,
    its images turned by 0, 90, 180, 270 degrees when an episode draws them, so no rotated copy is
    kept (``counts``/``offsets`` are then per class and point at the stored, unturned images: read
    images through ``read``). Classes belong to groups (``groups``: an Omniglot alphabet, a first
    folder level, a superclass) from which within-group episodes draw all their classes.
    """

    task = "classification"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str],
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        # uint8 images, or float vectors (pre-computed features, data=features) used as they are
        if not ((images.dtype == torch.uint8 and images.dim() == 4) or (images.is_floating_point() and images.dim() == 2)):
            raise ValueError("images must be a uint8 tensor [N, C, H, W] or a float tensor of vectors [N, d]")
        labels = torch.as_tensor(labels, dtype=torch.long)
        if len(labels) != len(images) or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(class_names)):
            raise ValueError("labels must give each image a class index in [0, len(class_names))")
        if len(labels) > 1 and not bool((labels[1:] >= labels[:-1]).all()):
            images = images[torch.argsort(labels, stable=True)].contiguous()
            labels = labels.sort(stable=True).values
        self.images = images
        self.counts = torch.bincount(labels, minlength=len(class_names))
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.class_names = list(class_names)
        self.max_count = int(self.counts.max()) if len(self.counts) else 0
        self.mean, self.std = mean, std
        # Each stored class is this many classes (its rotations by 90 degrees, turned when read); see rotate_classes.
        self.turns = 1
        # True when rotations already are classes of this store (rotate_classes, or a dataset that stores them).
        self.rotated = False
        # The group of each class; None: the first "/"-level of its name (Omniglot's alphabet, a first folder).
        self.class_groups: list[str] | None = None
        # The input transforms of training and evaluation episodes; the run sets them from data.normalize/augment.
        self.train_transform: Transform | None = None
        self.eval_transform: Transform | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return self.images.shape[0]

    def rotate_classes(self) -> "ClassStore":
        """Make each class four: its images turned by 0, 90, 180 and 270 degrees (Vinyals et al. 2016),
        named ``<name>/rot0`` .. ``<name>/rot270``, class ``4c + k`` turned ``k`` times; in place, lazily
        (the turn is applied when an episode reads the images), and only once. Square images only."""
        if self.rotated:
            return self
        if self.images.dim() != 4 or self.images.shape[-1] != self.images.shape[-2]:
            raise DataError(f"data.rotations turns images by 90 degrees and needs square images (got "
                            f"{list(self.images.shape[1:])}); set data.rotations=false")
        grouped = self.class_groups is not None or any("/" in name for name in self.class_names)
        groups = self.groups_of_classes()
        self.turns, self.rotated = 4, True
        self.counts = self.counts.repeat_interleave(4)
        self.offsets = self.offsets.repeat_interleave(4)
        self.class_names = [f"{name}/rot{90 * k}" for name in self.class_names for k in range(4)]
        # A class's turns stay in its group; classes without one (flat names) stay alone, not grouped by their turns.
        self.class_groups = [group for group in groups for _ in range(4)] if grouped else list(self.class_names)
        return self

    def materialized(self) -> "ClassStore":
        """This store with its turned classes stored (``every_image``), for readers of ``images``/``offsets`` (the
        torchmeta and learn2learn layers, embeddings); the store itself when nothing is turned lazily."""
        if self.turns == 1:
            return self
        images, labels = self.every_image()
        out = type(self).__new__(type(self))
        out.__dict__.update(self.__dict__)
        ClassStore.__init__(out, images, labels.to(images.device), self.class_names, mean=self.mean, std=self.std)
        out.rotated, out.class_groups = True, list(self.groups_of_classes())
        out.train_transform, out.eval_transform = self.train_transform, self.eval_transform
        return out

    def read(self, rows: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """The images at ``rows`` (positions in ``images``, any shape [...]) of classes ``classes`` (broadcast
        to ``rows``' shape), turned as their classes say: [..., C, H, W]."""
        images = self.images[rows]
        if self.turns == 1:
            return images
        # A turn is a permutation of the pixels: one gather turns every image by its own class's turn, with no
        # mask per turn (and so no host sync on an accelerator).
        size = images.shape[-1]
        grid = torch.arange(size * size, device=images.device).view(size, size)
        pixel_of = torch.stack([torch.rot90(grid, k).flatten() for k in range(self.turns)])  # [turns, H*W]
        index = pixel_of[(classes % self.turns).expand(rows.shape)]  # [..., H*W]
        flat = images.flatten(-2)  # [..., C, H*W]
        return flat.gather(-1, index.unsqueeze(-2).expand_as(flat)).view_as(images)

    def every_image(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(every image of every class, turned as its class says, [n, C, H, W]; its class [n]), in class order:
        the store as episodes see it (rotated classes materialised)."""
        labels = torch.arange(self.num_classes).repeat_interleave(self.counts.cpu())
        if self.turns == 1:
            return self.images, labels
        rows = torch.cat([torch.arange(o, o + n) for o, n in zip(self.offsets.tolist(), self.counts.tolist())])
        return self.read(rows.to(self.device), labels.to(self.device)), labels

    def groups_of_classes(self) -> list[str]:
        """Each class's group: ``class_groups`` if the dataset set them, else the first "/"-level of its name."""
        if self.class_groups is not None:
            return list(self.class_groups)
        return [name.split("/")[0] for name in self.class_names]

    def group_table(self, ways: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(group index of each class [num_classes], the indices of the groups with at least ``ways`` classes,
        the group names), on the store's device."""
        names = self.groups_of_classes()
        order = list(dict.fromkeys(names))
        index = {name: i for i, name in enumerate(order)}
        of_class = torch.tensor([index[name] for name in names], dtype=torch.long)
        sizes = torch.bincount(of_class, minlength=len(order))
        eligible = torch.nonzero(sizes >= ways).flatten()
        return of_class.to(self.device), eligible.to(self.device), order

    def check_groups(self, split: str, ways: int) -> None:
        """Raise a DataError naming the problem if no group of this split has ``ways`` classes."""
        of_class, eligible, names = self.group_table(ways)
        if len(eligible) == 0:
            sizes = torch.bincount(of_class.cpu(), minlength=len(names))
            largest = int(sizes.argmax()) if len(names) else 0
            biggest = f"the largest, {names[largest]}, has {int(sizes[largest])}" if names else "it has none"
            raise DataError(f"within_group episodes need a group of at least ways={ways} classes, and no group of the "
                            f"{split} split has that many ({len(names)} groups; {biggest}); lower ways, "
                            "or set within_group=false")

    def to(self, device: torch.device | str) -> "ClassStore":
        self.images = self.images.to(device)
        self.counts = self.counts.to(device)
        self.offsets = self.offsets.to(device)
        return self

    def sampler(self, ways: int, shots: int, queries: int, batch_size: int, seed: int,
                training: bool = False, within_group: bool = False) -> "EpisodeSampler":
        """Episodes of this split, with the training (augmenting) or the evaluation input transform;
        ``within_group``: every episode's classes from one group (see ``EpisodeSampler``)."""
        transform = self.train_transform if training else self.eval_transform
        return EpisodeSampler(self, ways, shots, queries, batch_size, seed, transform, within_group)

    def check_episode(self, split: str, ways: int, shots: int, queries: int) -> None:
        """Raise a DataError naming the problem if this split cannot give such episodes."""
        if ways < 1 or shots < 1 or queries < 1:
            raise DataError(f"episodes need ways, shots and queries >= 1 (got ways={ways} shots={shots} queries={queries})")
        if ways > self.num_classes:
            raise DataError(
                f"ways={ways} is more than the {self.num_classes} classes of the {split} split; "
                f"use ways<={self.num_classes} or a larger dataset"
            )
        need = shots + queries
        small = [(n, int(c)) for n, c in zip(self.class_names, self.counts.tolist()) if c < need]
        if len(small) == self.num_classes and len({c for _, c in small}) == 1:
            raise DataError(
                f"shots+queries={need} is more than the {small[0][1]} images per class of the {split} split; "
                f"lower shots or queries"
            )
        if small:
            shown = ", ".join(f"{n} ({c})" for n, c in small[:5])
            more = f" and {len(small) - 5} more" if len(small) > 5 else ""
            raise DataError(
                f"shots+queries={need} is more than the images of {len(small)} class(es) of the {split} split: "
                f"{shown}{more}; lower shots/queries or remove those classes from the data"
            )


class EpisodeSampler:
    """Draws batches of N-way K-shot tasks from a ClassStore, reproducibly from a seed.

    The sampler's state is its torch.Generator, saved in checkpoints so a
    resumed run draws the same episodes (and augmentations) as an uninterrupted one.
    ``transform(uint8 images, generator) -> float images`` makes the backbone's input
    (default: scale to [0, 1]); see ``data.transforms.EpisodeTransform``.

    ``within_group``: each task first draws a group, uniformly among the groups with at least
    ``ways`` classes (Lake et al.'s within-alphabet episodes, tieredImageNet's categories), then its
    classes within it; smaller groups are never drawn.
    """

    def __init__(self, store: ClassStore, ways: int, shots: int, queries: int, batch_size: int, seed: int,
                 transform: Transform | None = None, within_group: bool = False):
        self.store, self.ways, self.shots, self.queries, self.batch_size = store, ways, shots, queries, batch_size
        self.transform = transform
        self.generator = torch.Generator(device=store.device)
        self.generator.manual_seed(seed)
        self._labels = torch.arange(ways, device=store.device)
        self._slots = torch.arange(store.max_count, device=store.device)
        self._groups = store.group_table(ways)[:2] if within_group else None

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def sample(self) -> TaskBatch:
        s, g = self.store, self.generator
        B, N, K, Q = self.batch_size, self.ways, self.shots, self.queries
        dev = s.device
        # N distinct classes per task, in random order: the order is the label.
        noise = torch.rand(B, s.num_classes, generator=g, device=dev)
        if self._groups is not None:  # classes outside the task's group sort last
            of_class, eligible = self._groups
            group = eligible[torch.randint(len(eligible), (B,), generator=g, device=dev)]
            noise = noise.masked_fill(of_class[None, :] != group[:, None], 2.0)
        classes = noise.argsort(dim=1)[:, :N]
        counts = s.counts[classes]
        # K+Q distinct images per class; slots past a class's count sort last.
        noise = torch.rand(B, N, s.max_count, generator=g, device=dev)
        noise = noise.masked_fill(self._slots >= counts[..., None], 2.0)
        picks = noise.argsort(dim=2)[:, :, : K + Q] + s.offsets[classes][..., None]
        images = s.read(picks, classes[..., None])  # [B, N, K+Q, C, H, W] uint8
        labels = self._labels.view(1, N, 1).expand(B, N, K + Q)
        shape = images.shape[3:]
        sx, qx = images[:, :, :K].reshape(B, N * K, *shape), images[:, :, K:].reshape(B, N * Q, *shape)
        sy, qy = labels[:, :, :K].reshape(B, N * K), labels[:, :, K:].reshape(B, N * Q)
        # Shuffle within each set so example order carries no label (matters to sequence learners).
        sp = torch.rand(B, N * K, generator=g, device=dev).argsort(dim=1)
        qp = torch.rand(B, N * Q, generator=g, device=dev).argsort(dim=1)
        sx, sy = _gather_rows(sx, sp), sy.gather(1, sp)
        qx, qy = _gather_rows(qx, qp), qy.gather(1, qp)
        if self.transform is None:
            return TaskBatch(_to_float(sx), sy, _to_float(qx), qy, classes)
        return TaskBatch(self.transform(sx, g), sy, self.transform(qx, g), qy, classes)


def _gather_rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return x[torch.arange(x.shape[0], device=x.device)[:, None], perm]


def _to_float(x: torch.Tensor) -> torch.Tensor:
    if x.is_floating_point():  # feature vectors: already the model's input
        return x
    return x.float().div_(255.0)
