"""The package's shape as the redesign promised it: small rooms, a core without Lightning, private APIs in one place."""

import ast
import importlib.util
import inspect
import pathlib
import re

import lightning.pytorch as pl
import torch
import torch_pruning as tp
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DDPStrategy

from lightning_halfprune import HalfPrune
from lightning_halfprune._compat import torch_pruning as tpc

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "lightning_halfprune"
TORCH_MODULE_INTERNALS = {"_modules", "_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks", "_version"}


def test_no_room_is_over_500_lines():
    big = {str(f.relative_to(SRC)): n for f in SRC.rglob("*.py") if (n := len(f.read_text().splitlines())) > 500}
    assert not big


def test_the_constructor_takes_at_most_20_named_arguments():
    params = list(inspect.signature(HalfPrune.__init__).parameters.values())[1:]
    named = [p for p in params if p.kind is not p.VAR_KEYWORD]
    assert len(named) <= 20, [p.name for p in named]
    assert [p.name for p in params if p.kind is p.VAR_KEYWORD] == ["flat"]  # the one-release shim for 0.1's names


def test_core_never_imports_lightning():
    """``core/`` imports nothing of Lightning, nor the Lightning-aware rooms of the package (checked statically)."""
    allowed = ("lightning_halfprune.core", "lightning_halfprune._compat.torch_pruning")
    bad = []
    for f in (SRC / "core").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                top = name.split(".")[0]
                ours_outside = top == "lightning_halfprune" and not any(
                    name == a or name.startswith(a + ".") for a in allowed
                ) and name not in ("lightning_halfprune.core", "lightning_halfprune._compat")
                if top in ("lightning", "pytorch_lightning") or ours_outside:
                    bad.append(f"{f.name}:{node.lineno} {name}")
    assert not bad


def _privates_of(package: str) -> set[str]:
    root = pathlib.Path(importlib.util.find_spec(package).origin).parent
    found: set[str] = set()
    for f in root.rglob("*.py"):
        found |= set(re.findall(r"(?:self\.|def |class |^)(_[A-Za-z]\w*)", f.read_text(errors="ignore"), flags=re.M))
    return found


def test_private_names_of_torch_pruning_and_lightning_are_touched_only_in_compat():
    theirs = (_privates_of("torch_pruning") | _privates_of("lightning")) - TORCH_MODULE_INTERNALS
    hits = []
    for f in SRC.rglob("*.py"):
        if "_compat" in f.parts:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("lightning", "torch_pruning"):
                hits += [f"{f.name}: import {a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.Attribute) and node.attr in theirs:
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    hits.append(f"{f.relative_to(SRC)}:{node.lineno} .{node.attr}")
    assert not hits


def test_every_private_name_compat_relies_on_still_exists():
    low, high = tpc.SUPPORTED
    version = tuple(int(x) for x in tpc.installed().split(".")[:2])
    assert tuple(map(int, low.split("."))) <= version < tuple(map(int, high.split(".")))
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=torch.zeros(1, 4))
    group = graph.get_pruning_group(net[0], tp.prune_linear_out_channels, [0])
    assert tpc.module_names(graph)[net[0]] == "0" and isinstance(tpc.param_names(graph), dict)
    assert tpc.graph_of(group) is graph
    assert hasattr(tpc.BasePruningFunc, "_prune_parameter_and_grad") and hasattr(tpc.SplitOp, "__init__")
    assert "_stride" in inspect.getsource(tpc.FlattenIndexMapping.__init__)
    assert callable(DDPStrategy._setup_model) and callable(DDPStrategy._register_ddp_hooks)
    assert callable(LightningCLI._instantiate_trainer)
    assert hasattr(ModelCheckpoint(), "_last_global_step_saved") and hasattr(pl.LightningModule(), "_trainer")
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    assert callable(_TrainingEpochLoop._should_accumulate)  # HalfPrune lets go of spent gradients by it
