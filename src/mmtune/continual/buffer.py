"""Rehearsal memories: a reservoir buffer (Vitter's algorithm R) and a class-balanced buffer.

Both hold at most ``capacity`` items (an item is one training example: a dict of tensors,
numbers and strings, optionally with extra fields such as DER++'s stored logits). Items live
in memory, or on disk (one file per slot, written atomically) when a ``path`` is given, so a
large memory need not fit in RAM. The sampling decisions come from the buffer's own seeded
generator, whose state is part of ``state_dict`` -- resuming gives the same buffer.

- :class:`ReservoirBuffer`: after n items offered, every one of them is in the buffer with
  probability capacity/n (Vitter 1985, "Random sampling with a reservoir", algorithm R).
- :class:`ClassBalancedBuffer`: class-balanced reservoir sampling (Chrysakis & Moens 2020,
  "Online continual learning from imbalanced data", CBRS): while the memory is full, a new
  item of a class that is not among the largest classes replaces a random item of a largest
  class; an item of a largest class replaces a random item of its own class with probability
  m_c / n_c (stored / seen of that class), i.e. a reservoir within the class. Small classes
  are never evicted in favour of large ones, so every seen class keeps about capacity/C slots.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..errors import ConfigError


class _MemoryStore:
    def __init__(self):
        self.items: list = []

    def __len__(self) -> int:
        return len(self.items)

    def get(self, i: int):
        return self.items[i]

    def put(self, i: int, item) -> None:
        if i == len(self.items):
            self.items.append(item)
        else:
            self.items[i] = item

    def state_dict(self) -> dict:
        return {"items": list(self.items)}

    def load_state_dict(self, state: dict) -> None:
        self.items = list(state["items"])


class _DiskStore:
    """Items as files under ``path``. Every write goes to a new file (``slot-S-vV.pt``, written to a
    temp name and renamed), and ``index`` maps a slot to its current file. A replaced file is
    deleted only once no recent ``state_dict`` refers to it (the last ``keep_states``), so a run
    that crashes after changing the buffer but before saving its state resumes from a saved
    state whose files still exist. Files no state refers to are removed on ``load_state_dict``.
    """

    def __init__(self, path: str | Path, keep_states: int = 3):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.index: list[str] = []
        self.version = 0
        self.keep_states = keep_states
        self._recent: list[set[str]] = []

    def __len__(self) -> int:
        return len(self.index)

    def get(self, i: int):
        return torch.load(self.path / self.index[i], map_location="cpu", weights_only=False)

    def put(self, i: int, item) -> None:
        self.version += 1
        name = f"slot-{i:08d}-v{self.version:010d}.pt"
        tmp = self.path / f".tmp-{name}-{os.getpid()}"
        torch.save(item, tmp)
        os.replace(tmp, self.path / name)
        if i == len(self.index):
            self.index.append(name)
        else:
            old, self.index[i] = self.index[i], name
            if not any(old in s for s in self._recent):
                (self.path / old).unlink(missing_ok=True)

    def _collect(self, keep: set[str]) -> None:
        for f in self.path.glob("slot-*.pt"):
            if f.name not in keep:
                f.unlink(missing_ok=True)

    def state_dict(self) -> dict:
        self._recent = (self._recent + [set(self.index)])[-self.keep_states:]
        self._collect(set().union(*self._recent))
        return {"path": str(self.path), "index": list(self.index), "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        if Path(state["path"]).resolve() != self.path.resolve():
            raise ConfigError(f"disk buffer state points at {state['path']}, but this buffer lives in {self.path}")
        missing = [f for f in state["index"] if not (self.path / f).is_file()]
        if missing:
            raise ConfigError(f"disk buffer {self.path} lacks the files {missing[:3]}; it cannot be resumed. "
                              "Delete the run's output_dir and start again.")
        self.index, self.version = list(state["index"]), state["version"]
        self._recent = [set(self.index)]
        self._collect(set(self.index))


def _detach(item):
    if torch.is_tensor(item):
        return item.detach().cpu()
    if isinstance(item, dict):
        return {k: _detach(v) for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        return type(item)(_detach(v) for v in item)
    return item


def item_nbytes(item) -> dict[str, int]:
    """Bytes of each field of a memory item as tensors: stored tensors at their dtype, lists of
    integers (token ids, labels) as the int64 tensors a batch is collated into, numbers 8 bytes.
    Strings and other fields count 0 (they are metadata, not what the strategy trains on)."""
    out = {}
    for k, v in (item.items() if isinstance(item, dict) else [("item", item)]):
        if torch.is_tensor(v):
            out[k] = v.nelement() * v.element_size()
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
            out[k] = 8 * len(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = 8
    return out


class ReservoirBuffer:
    """Uniform sample of everything offered so far (algorithm R).

    Args:
        capacity: the most items kept.
        seed: seeds the generator that decides replacements and draws samples.
        path: keep items on disk under this directory instead of in memory.
    """

    def __init__(self, capacity: int, seed: int = 0, path: str | Path | None = None):
        if capacity <= 0:
            raise ConfigError(f"buffer capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.rng = random.Random(seed)
        self.store = _DiskStore(path) if path is not None else _MemoryStore()
        self.seen = 0

    def __len__(self) -> int:
        return len(self.store)

    def add(self, item) -> int | None:
        """Offer one item; returns the slot it went to, or None if it was not kept."""
        self.seen += 1
        if len(self.store) < self.capacity:
            slot = len(self.store)
        else:
            # Vitter's algorithm R: keep the n-th item with probability capacity / n.
            j = self.rng.randrange(self.seen)
            if j >= self.capacity:
                return None
            slot = j
        self.store.put(slot, _detach(item))
        return slot

    def extend(self, items: Iterable) -> list[int | None]:
        return [self.add(it) for it in items]

    def __getitem__(self, i: int):
        return self.store.get(i)

    def update(self, i: int, item) -> None:
        """Replace the item in slot ``i`` (e.g. to attach fields computed after insertion)."""
        self.store.put(i, _detach(item))

    def items(self) -> list:
        return [self.store.get(i) for i in range(len(self.store))]

    def nbytes(self) -> dict:
        """The memory's size: ``total`` bytes, ``per_example`` (mean), and ``fields`` (bytes per
        example of each field, e.g. DER++'s ``_logits``), counted by :func:`item_nbytes`."""
        fields: dict[str, int] = {}
        for i in range(len(self.store)):
            for k, v in item_nbytes(self.store.get(i)).items():
                fields[k] = fields.get(k, 0) + v
        n, total = len(self.store), sum(fields.values())
        return {"total": total, "per_example": total / n if n else 0.0,
                "fields": {k: v / n for k, v in fields.items()} if n else {}}

    def sample(self, k: int, generator: random.Random | None = None) -> list:
        """``k`` items drawn uniformly without replacement (all of them if fewer are stored)."""
        rng = generator or self.rng
        idx = rng.sample(range(len(self.store)), min(k, len(self.store)))
        return [self.store.get(i) for i in idx]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "seen": self.seen, "rng": self.rng.getstate(),
                "store": self.store.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.capacity, self.seen = state["capacity"], state["seen"]
        self.rng.setstate(state["rng"])
        self.store.load_state_dict(state["store"])


class ClassBalancedBuffer(ReservoirBuffer):
    """Class-balanced reservoir (CBRS). ``label_fn(item)`` gives an item's class (any hashable)."""

    def __init__(self, capacity: int, label_fn: Callable, seed: int = 0, path: str | Path | None = None):
        super().__init__(capacity, seed, path)
        self.label_fn = label_fn
        self.labels: list = []  # class of the item in each slot
        self.class_seen: dict = {}
        self._counts: dict = {}

    def counts(self) -> dict:
        """Stored items per class."""
        return dict(self._counts)

    def _random_slot_of(self, c) -> int:
        slots = [i for i, lab in enumerate(self.labels) if lab == c]
        return slots[self.rng.randrange(len(slots))]

    def add(self, item) -> int | None:
        self.seen += 1
        c = self.label_fn(item)
        self.class_seen[c] = self.class_seen.get(c, 0) + 1
        if len(self.store) < self.capacity:
            slot = len(self.store)
            self.labels.append(c)
        else:
            largest = max(self._counts.values())
            if self._counts.get(c, 0) < largest:
                # Evict a random item of one of the largest classes.
                big = sorted((k for k, v in self._counts.items() if v == largest), key=repr)
                victim = big[self.rng.randrange(len(big))] if len(big) > 1 else big[0]
                slot = self._random_slot_of(victim)
                self._counts[victim] -= 1
            else:
                # Reservoir within the class: keep with probability m_c / n_c.
                if self.rng.random() >= self._counts[c] / self.class_seen[c]:
                    return None
                slot = self._random_slot_of(c)
                self._counts[c] -= 1
            self.labels[slot] = c
        self._counts[c] = self._counts.get(c, 0) + 1
        self.store.put(slot, _detach(item))
        return slot

    def state_dict(self) -> dict:
        return {**super().state_dict(), "labels": list(self.labels), "class_seen": dict(self.class_seen)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.labels = list(state["labels"])
        self.class_seen = dict(state["class_seen"])
        self._counts = {}
        for c in self.labels:
            self._counts[c] = self._counts.get(c, 0) + 1


def build_buffer(kind: str, capacity: int, *, seed: int = 0, path: str | Path | None = None,
                 label_fn: Callable | None = None) -> ReservoirBuffer:
    """``kind``: ``reservoir`` or ``class_balanced`` (needs ``label_fn``)."""
    if kind == "reservoir":
        return ReservoirBuffer(capacity, seed, path)
    if kind == "class_balanced":
        if label_fn is None:
            raise ValueError("a class-balanced buffer needs label_fn")
        return ClassBalancedBuffer(capacity, label_fn, seed, path)
    raise ConfigError(f"unknown buffer kind '{kind}'; valid: reservoir, class_balanced")
