"""Tensors handed to a collective or a fused op are made on the parameters' device (a static check, and set_gkp).

NCCL refuses CPU tensors and the fused CUDA kernels refuse tensors on another device, but the DDP tests run on gloo
and the CPU kernels take CPU tensors, so no CPU run shows a tensor left on the CPU. The check reads lt_recipes/ with
`ast` instead and reports two patterns:
  1. a tensor factory called without `device=` (torch.tensor, torch.zeros, ..., or `.cpu()`) whose result reaches a
     collective (all_reduce_, dist.all_reduce, broadcast, all_gather*, ...) or a fused op (`ops.*`), directly as an
     argument or through local variables assigned from it in the same function;
  2. a step method (lt_recipes/steps/) that keeps one of its tensor arguments on `self` as it came, not moved with
     `.to(...)`: the steps' fused GKP and GSA ops then get a user's CPU tensors on a GPU model.
The self-test below runs the check on snippets, among them the lines that failed on a GPU (the `rise` tensor of
steps/sam.py handed to all_reduce_, and set_gkp keeping the user's anchors), so the check's power is itself tested.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lt_recipes.gkp import gkp_strength
from lt_recipes.grouping import MemoryBank
from lt_recipes.steps import create_step

ROOT = Path(__file__).resolve().parents[1]

FACTORIES = {"tensor", "as_tensor", "asarray", "zeros", "ones", "empty", "full", "arange", "linspace", "logspace",
             "eye", "rand", "randn", "randint", "randperm", "from_numpy", "scalar_tensor", "empty_strided"}
COLLECTIVES = {"all_reduce_", "all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv"}
MOVES = {"to", "cuda"}  # a method call that puts its receiver on a device


def _dotted(node: ast.AST) -> list[str]:
    """`a.b.c` as ["a", "b", "c"] ([] for anything else)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else []


def _is_sink(call: ast.Call) -> bool:
    name = _dotted(call.func)
    return bool(name) and (name[-1] in COLLECTIVES or "ops" in name[:-1])


class _Function:
    """Taint of one function's local names, in source order."""

    def __init__(self, fn: ast.AST, filename: str) -> None:
        self.fn, self.filename = fn, filename
        self.bad: dict[str, int] = {}
        self.found: list[str] = []

    def tainted(self, node: ast.AST) -> int | None:
        """The line of the undeviced factory that `node`'s value comes from (None: none)."""
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            if len(name) == 2 and name[0] == "torch" and name[1] in FACTORIES:
                given = {k.arg for k in node.keywords}
                return None if "device" in given or None in given else node.lineno
            if isinstance(node.func, ast.Attribute):
                if node.func.attr in MOVES:
                    return None
                if node.func.attr == "cpu":
                    return node.lineno
                return self.tainted(node.func.value)  # .double(), .view(...), ... keep the device
            return None
        if isinstance(node, ast.Name):
            return self.bad.get(node.id)
        if isinstance(node, ast.Subscript):
            return self.tainted(node.value)
        if isinstance(node, ast.BinOp):
            return self.tainted(node.left) or self.tainted(node.right)
        if isinstance(node, ast.UnaryOp):
            return self.tainted(node.operand)
        return None

    def visit(self, node: ast.AST) -> None:
        """Walk statements in source order; nested functions are checked on their own."""
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)) and node is not self.fn:
            return
        if isinstance(node, ast.Call) and _is_sink(node):
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                line = self.tainted(arg)
                if line is not None:
                    self.found.append(f"{self.filename}:{node.lineno}: {ast.unparse(node.func)} gets a tensor made "
                                      f"without device= (line {line})")
        for child in ast.iter_child_nodes(node):
            self.visit(child)
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None:
            line = self.tainted(node.value)
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    if line is not None:
                        self.bad[target.id] = line
                    elif not isinstance(node, ast.AugAssign):  # `t += x` leaves t where it was
                        self.bad.pop(target.id, None)


def _tensor_args(fn: ast.FunctionDef) -> set[str]:
    return {a.arg for a in [*fn.args.args, *fn.args.kwonlyargs]
            if a.annotation is not None and "Tensor" in ast.unparse(a.annotation)}


def _kept_as_given(fn: ast.FunctionDef, filename: str) -> list[str]:
    """Pattern 2: `self.x = arg` (or a tuple holding `arg`) for a tensor argument `arg`."""
    args, found = _tensor_args(fn), []
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and _dotted(t)[:1] == ["self"]
                                                for t in node.targets):
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for v in values:
                if isinstance(v, ast.Name) and v.id in args:
                    found.append(f"{filename}:{node.lineno}: {fn.name} keeps its tensor argument {v.id} on self "
                                 "without moving it to the parameters' device")
    return found


def undeviced_tensors(source: str, filename: str = "<snippet>", step_module: bool = True) -> list[str]:
    """Every place in `source` where a tensor made without a device reaches a collective or a fused op, and (for a
    step module) every tensor argument a method keeps on self as it came."""
    tree = ast.parse(source)
    found = []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    for fn in [tree, *functions]:
        check = _Function(fn, filename)
        check.visit(fn)
        found += check.found
        if step_module and isinstance(fn, ast.FunctionDef) and fn.args.args[:1] and fn.args.args[0].arg == "self":
            found += _kept_as_given(fn, filename)
    return found


# ---- the check's own power -------------------------------------------------------------------------------------------

BAD = {
    "steps/sam.py before the fix: a CPU float64 tensor to all_reduce_": """
        def second_step(self, perturbed, before):
            rise = torch.tensor([float(perturbed.detach()) - before], dtype=torch.float64)
            stats.ascent = [float(all_reduce_(rise)) / world_size()]
        """,
    "steps/core.py before the fix: set_gkp keeps the user's anchors": """
        class Step:
            def set_gkp(self, anchors: torch.Tensor, fisher: torch.Tensor, strength: torch.Tensor) -> None:
                self.gkp_terms = (anchors, fisher, strength)
        """,
    "a factory straight into a fused op": "ops.gkp_penalty(theta, anchors, fisher, torch.ones(3))\n",
    "through two names and a method": """
        def f(x):
            counts = torch.zeros(4)
            c = counts.double()[1:]
            dist.all_reduce(c)
        """,
    "a .cpu() copy into a broadcast": "def f(x):\n    y = x.cpu() * 2\n    dist.broadcast(y, src=0)\n",
    "still on the cpu after an in-place add": "def f(x):\n    t = torch.ones(3)\n    t += x\n    all_reduce_(t)\n",
}
GOOD = {
    "the fixed rise": """
        def second_step(self, perturbed, before):
            rise = torch.tensor([float(perturbed) - before], dtype=torch.float64, device=self.flat.data.device)
            stats.ascent = [float(all_reduce_(rise)) / world_size()]
        """,
    "the fixed set_gkp": """
        class Step:
            def set_gkp(self, anchors: torch.Tensor, fisher: torch.Tensor, strength: torch.Tensor) -> None:
                device = self.flat.data.device
                self.gkp_terms = (anchors.to(device), fisher.to(device), strength.to(device))
        """,
    "moved before the collective": """
        def f(labels, device):
            group_of = torch.as_tensor(labels, dtype=torch.int64).to(device)
            dist.broadcast(group_of, src=0)
        """,
    "rebound to a device tensor": """
        def f(x):
            t = torch.zeros(3)
            t = x.new_zeros(3)
            all_reduce_(t)
        """,
    "*_like and not a sink": "def f(x):\n    all_reduce_(torch.zeros_like(x))\n    print(torch.zeros(3))\n",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_the_check_finds_a_tensor_left_on_the_cpu(name: str) -> None:
    assert undeviced_tensors(textwrap.dedent(BAD[name])), name


@pytest.mark.parametrize("name", sorted(GOOD))
def test_the_check_passes_tensors_made_on_the_device(name: str) -> None:
    assert undeviced_tensors(textwrap.dedent(GOOD[name])) == [], name


# ---- the package ----------------------------------------------------------------------------------------------------


def test_every_tensor_for_a_collective_or_fused_op_is_made_on_the_parameters_device() -> None:
    found = []
    files = sorted((ROOT / "lt_recipes").rglob("*.py"))
    assert len(files) > 20
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        found += undeviced_tensors(path.read_text(encoding="utf-8"), rel,
                                   step_module=rel.startswith("lt_recipes/steps/"))
    assert found == []


# ---- set_gkp and the own-loop helpers ---------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.classifier = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.body(x)))


@pytest.mark.parametrize("step_name", ["gsa", "sam"])
def test_set_gkp_keeps_the_tensors_on_the_parameters_device(step_name: str) -> None:
    """The README's own loop hands set_gkp CPU anchors, Fisher rows and strengths; the step keeps them where its
    parameters are. No GPU here: the flat parameters are swapped for a `meta` tensor after the step is built (flat
    parameters cannot be built on meta), so a tensor left on the CPU stays visibly on the CPU."""
    model = _Net()
    step = create_step(step_name, model, torch.optim.SGD(model.parameters(), lr=0.1))
    step.set_groups([0, 1], [3, 1])
    n = step.num_covered
    step.flat.data = torch.empty(step.flat.data.shape, device="meta")
    step.set_gkp(torch.zeros(2, n), torch.ones(2, n), gkp_strength([1, 1], [3, 1], lam=1.0, norm="per_samples"))
    assert [t.device.type for t in (step.gkp.anchors, step.gkp.fisher, step.gkp.strength)] == ["meta"] * 3


def test_own_loop_helpers_make_their_tensors_on_the_asked_device() -> None:
    bank = MemoryBank(2)
    bank.update(torch.tensor([1.0, 1.0]), torch.arange(4.0))
    assert bank.anchors(np.array([0, 1]), 2, device="meta").device.type == "meta"
    assert torch.equal(bank.anchors(np.array([0, 1]), 2), torch.arange(4.0).expand(2, 4))
    assert gkp_strength([1, 2], [3, 4], lam=2.0, norm="per_classes", device="meta").device.type == "meta"
