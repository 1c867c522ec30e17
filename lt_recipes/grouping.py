"""Memory-based grouping (paper Eq. 1-3; docs/method.md section 1): per-class best encoder states, cut into G groups.

The paper's bank keeps one encoder copy per class. Every entry is one of the snapshots taken at evaluation points,
so this bank stores each *distinct referenced* snapshot once plus a class -> snapshot index, and keeps the pairwise
dot products of stored snapshots, which is all the class affinity needs. Memory grows with the number of distinct
snapshots, not with the number of classes; groups and anchors are the same as the naive bank's.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from scipy.sparse.csgraph import connected_components
from safetensors.torch import load_file, save_file

from .equations import spectral_groups

_logger = logging.getLogger(__name__)

# The float types of the bank snapshots (groups.bank_dtype) and the GKP anchors and Fisher rows (gkp.state_dtype).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.double(), b.double()))


class MemoryBank:
    """Per-class best encoder states (Eq. 1), stored as distinct snapshots on the CPU (fp32 or bf16), optionally on disk."""

    def __init__(self, num_classes: int, dtype: str = "fp32", spill_dir: str | None = None) -> None:
        self.num_classes = num_classes
        self.dtype = DTYPES[dtype]
        self.spill_dir = spill_dir
        self.class_snapshot = [-1] * num_classes
        self.best_q = torch.full((num_classes,), -math.inf, dtype=torch.float64)
        self.snapshots: dict[int, torch.Tensor] = {}
        self.sq_norms: dict[int, float] = {}
        self.dots: dict[tuple[int, int], float] = {}
        self.next_uid = 0
        self._pinned: set[int] = set()
        if spill_dir:
            os.makedirs(spill_dir, exist_ok=True)

    # ---- storage -------------------------------------------------------------------------------------------
    @property
    def uids(self) -> list[int]:
        """Distinct snapshots referenced by at least one class, in creation order."""
        return sorted(set(u for u in self.class_snapshot if u >= 0))

    def _path(self, uid: int) -> str:
        return os.path.join(self.spill_dir, f"snapshot_{uid:06d}.safetensors")

    def _store(self, uid: int, vec: torch.Tensor) -> None:
        if self.spill_dir:
            tmp = self._path(uid) + ".tmp"
            save_file({"theta": vec}, tmp)
            os.replace(tmp, self._path(uid))
        else:
            self.snapshots[uid] = vec

    def snapshot(self, uid: int) -> torch.Tensor:
        """The stored encoder vector of snapshot `uid`."""
        if not self.spill_dir:
            return self.snapshots[uid]
        path = self._path(uid)
        try:
            return load_file(path)["theta"]
        except (OSError, KeyError, RuntimeError) as e:
            raise RuntimeError(f"memory bank snapshot {path} cannot be read: {e}") from None

    @property
    def nbytes(self) -> int:
        """Bytes of stored snapshots (in memory or on disk)."""
        per = self.dtype.itemsize
        numel = next((v.numel() for v in self.snapshots.values()), None)
        if numel is None and self.uids:
            numel = self.snapshot(self.uids[0]).numel()
        return per * (numel or 0) * len(self.uids)

    @property
    def host_nbytes(self) -> int:
        """Bytes of snapshots held in host memory (none when they are spilled to disk)."""
        return sum(v.numel() * v.element_size() for v in self.snapshots.values())

    def _prune(self) -> None:
        live = set(self.uids)
        for uid in [u for u in self.sq_norms if u not in live]:
            del self.sq_norms[uid]
            self.snapshots.pop(uid, None)
            if self.spill_dir and uid not in self._pinned and os.path.exists(self._path(uid)):
                os.unlink(self._path(uid))
        self.dots = {k: v for k, v in self.dots.items() if k[0] in live and k[1] in live}

    # ---- Eq. 1 ---------------------------------------------------------------------------------------------
    def update(self, q: torch.Tensor, theta_enc: torch.Tensor) -> list[int]:
        """Classes whose quality improved (or that have no entry yet) now point at a snapshot of `theta_enc`."""
        q = q.double().cpu()
        improved = [c for c in range(self.num_classes) if q[c] > self.best_q[c] or self.class_snapshot[c] < 0]
        if not improved:
            return []
        uid = self.next_uid
        self.next_uid += 1
        vec = theta_enc.detach().to(device="cpu", dtype=self.dtype).clone()
        for other in self.uids:
            self.dots[(other, uid)] = _dot(self.snapshot(other), vec)
        self.sq_norms[uid] = _dot(vec, vec)
        self._store(uid, vec)
        for c in improved:
            self.class_snapshot[c] = uid
            self.best_q[c] = q[c]
        self._prune()
        return improved

    # ---- Eq. 2-3 inputs ------------------------------------------------------------------------------------
    def _cos(self, a: int, b: int) -> float:
        if a == b:
            return 1.0
        dot = self.dots[(min(a, b), max(a, b))]
        den = math.sqrt(self.sq_norms[a] * self.sq_norms[b])
        return max(-1.0, min(1.0, dot / den)) if den > 0 else 0.0

    def affinity(self) -> np.ndarray:
        """Class affinity (cos + 1) / 2 between the classes' bank entries, from stored dot products."""
        uids = self.uids
        cos = np.array([[self._cos(a, b) for b in uids] for a in uids])
        idx = np.array([uids.index(u) for u in self.class_snapshot])
        return (cos[np.ix_(idx, idx)] + 1) / 2

    def anchors(self, assignment: np.ndarray, num_groups: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
        """Eq. 3 anchors theta*_g = mean of member classes' entries, streaming each snapshot once; on `device` (the
        model's, for the fused GKP op; None: the CPU, where the snapshots are)."""
        acc = None
        sizes = np.bincount(assignment, minlength=num_groups)
        entries = np.asarray(self.class_snapshot)
        for uid in self.uids:
            vec = self.snapshot(uid).float()
            if acc is None:
                acc = torch.zeros(num_groups, vec.numel(), dtype=torch.float32)
            members = np.bincount(assignment[entries == uid], minlength=num_groups)
            for g in np.flatnonzero(members):
                acc[g].add_(vec, alpha=float(members[g] / sizes[g]))
        return acc.to(device=device, dtype=dtype)

    # ---- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the bank; with spilling, the files it references are pinned on disk."""
        self._pinned = set(self.uids)
        return {"class_snapshot": list(self.class_snapshot), "best_q": self.best_q.clone(),
                "sq_norms": {int(k): v for k, v in self.sq_norms.items()},
                "dots": [[a, b, v] for (a, b), v in self.dots.items()], "next_uid": self.next_uid,
                "snapshots": {} if self.spill_dir else dict(self.snapshots)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.class_snapshot = list(state["class_snapshot"])
        self.best_q = state["best_q"].clone()
        self.sq_norms = {int(k): float(v) for k, v in state["sq_norms"].items()}
        self.dots = {(int(a), int(b)): float(v) for a, b, v in state["dots"]}
        self.next_uid = int(state["next_uid"])
        self.snapshots = {int(k): v for k, v in state["snapshots"].items()}
        self._pinned = set(self.uids)
        for uid in self.uids:
            if self.spill_dir and not os.path.exists(self._path(uid)):
                raise RuntimeError(f"memory bank snapshot {self._path(uid)} referenced by the checkpoint is missing")


@dataclass(frozen=True)
class Groups:
    """A realised grouping of the classes: the group of every class, and each group's classes and training samples.
    Its `count` is the one group count every step, summary column and artifact reads."""

    of_class: np.ndarray
    classes: tuple[int, ...]
    samples: tuple[int, ...]

    @classmethod
    def from_labels(cls, labels: Sequence[int] | np.ndarray, train_counts: Sequence[int]) -> "Groups":
        """The grouping of a group-id-per-class array (ids 0..G-1, every group non-empty)."""
        labels = np.asarray(labels, dtype=np.int64)
        counts = np.asarray(train_counts)
        G = int(labels.max()) + 1
        return cls(labels, tuple(int((labels == g).sum()) for g in range(G)),
                   tuple(int(counts[labels == g].sum()) for g in range(G)))

    @property
    def count(self) -> int:
        return len(self.classes)

    def members(self) -> list[list[int]]:
        """The classes of every group."""
        return [np.flatnonzero(self.of_class == g).tolist() for g in range(self.count)]



def say_fewer_groups(where: str, groups: Groups, asked: int, num_classes: int, detail: str = "") -> None:
    """Log that a grouping (`where`) realised fewer groups than asked; the run trains with the ones it has."""
    _logger.warning("%s gave %d groups of the %d asked (%d classes%s); the run uses the %d it has", where,
                    groups.count, asked, num_classes, f", {detail}" if detail else "", groups.count)


def compute_groups(bank: MemoryBank, num_groups: int, train_counts: list[int], seed: int = 0) -> np.ndarray:
    """Cut the classes into groups (Eq. 2); returns a group id per class, groups ordered head first.

    Degenerate cases: G >= number of classes (one class per group), fewer distinct snapshots than G (classes sharing
    a snapshot are indistinguishable, so one group per snapshot), and a disconnected affinity graph (a tiny uniform
    affinity is added so the normalized cut is defined). The grouping may have fewer groups than `num_groups`; the
    method that asked says so (`Groups` holds the realised grouping).
    """
    num_classes = bank.num_classes
    uids = bank.uids
    if num_groups >= num_classes:
        labels = np.arange(num_classes)
    elif len(uids) <= num_groups:
        labels = np.array([uids.index(u) for u in bank.class_snapshot])
    else:
        aff = bank.affinity()
        n_comp, _ = connected_components(aff > 0, directed=False)
        if n_comp > 1:
            _logger.warning("groups: affinity graph has %d connected components; adding 1e-6 to every edge", n_comp)
            aff = aff + 1e-6
        labels = spectral_groups(aff, num_groups, seed)
    return order_head_first(labels, train_counts)


def order_head_first(labels: np.ndarray, train_counts: list[int]) -> np.ndarray:
    """Relabel groups 0..G'-1 (dropping empty ones) by decreasing training samples, so group 0 is the head group."""
    counts = np.asarray(train_counts)
    present = np.unique(labels)
    order = sorted(present, key=lambda g: (-counts[labels == g].sum(), int(np.flatnonzero(labels == g)[0])))
    remap = {int(g): i for i, g in enumerate(order)}
    return np.array([remap[int(g)] for g in labels], dtype=np.int64)
