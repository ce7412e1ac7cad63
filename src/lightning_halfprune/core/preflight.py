"""A cut never leaves a broken model, and what cannot be cut shows up before the first training step.

``Surgeon.cut`` already refuses (and undoes) a cut whose pruned model no longer runs the example input. This room
decides what happens then:

- ``preflight`` (at train start): dry-runs the schedule's *final* ratio - plan, cut, forward, undo (copy-free) - and
  finds every coupled group that cannot be cut safely ("would empty a coupled layer", torch-pruning failing on it,
  a broken forward). Those groups are left alone for the rest of the fit, as if listed in ``ignored_layers``, with
  one warning naming them; if no group is left, the fit refuses to start and says what to put in
  ``ignored_layers``. It plans with the L2 magnitude scorer whatever the fit's scorer is: it checks how *many*
  channels each group loses, not which, needs no data, and leaves the scorer's state (e.g. a seeded random scorer)
  alone. Model, optimizer and RNG state are untouched.
- ``cut_safely`` (at each prune point): if a cut breaks the forward anyway (a failure only some widths show), the
  groups responsible are found, left out from then on with a warning, and the rest is cut; the fit goes on. Only
  if nothing at all can be cut does it raise, with the model and optimizer exactly as before the cut.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn

from lightning_halfprune.core import attention as attn
from lightning_halfprune.core import log
from lightning_halfprune.core.cut import ParamRemap
from lightning_halfprune.core.errors import BrokenForward, SurgeryError
from lightning_halfprune.core.group_search import check_stop
from lightning_halfprune.core.measure import count_params
from lightning_halfprune.core.plan import Cut
from lightning_halfprune.core.scoring import get_scorer
from lightning_halfprune.core.surgeon import Surgeon

SCORER = "l2"  # what the dry run plans with: needs no data, has no state
MAX_LISTED = 8  # reasons listed in one message
MAX_RATIOS = 8  # distinct ratios of a schedule dry-run at train start (the largest ones)
EMBEDDING_NOTE = 0.3  # share of the params in kept embeddings from which the user is told


class PreflightWarning(UserWarning):
    """Some coupled groups cannot be pruned safely and are left alone for the rest of the fit."""


def preflight(surgeon: Surgeon, ratios: Sequence[float], known: dict[str, str] | None = None) -> dict[str, str]:
    """Dry-run a cut to each of ``ratios``; leave out (and warn once about) groups that cannot be cut safely.

    Every ratio of the schedule gives other widths, and a model can break at one width but not another (a view
    into heads breaks unless the width is a multiple of the head size), so each is tried, from the cumulative
    original widths just as the real cut will. ``known``: groups left out earlier in this fit (before a resume).
    Returns group name -> why it was left out. Raises ``SurgeryError`` if no prunable group is left.
    """
    left_out = dict(known or {})
    surgeon.ignore(list(left_out))
    for ratio in sorted(set(ratios), reverse=True)[:MAX_RATIOS]:
        cuts = surgeon.plan(ratio, guarded(get_scorer(SCORER), surgeon, left_out))
        surgeon.ignore([name for name in left_out if name not in _ignored(surgeon)])
        cuts = [c for c in cuts if c.layer not in left_out]
        while cuts:
            check_stop()  # SIGTERM between dry runs (``fit.checks.stop_on_sigterm``)
            try:
                surgeon.cut(cuts, dry_run=True)
                break
            except SurgeryError as err:
                culprits = _culprits(surgeon, cuts, err)
            left_out.update(culprits)
            cuts = [c for c in cuts if c.layer not in culprits]
        surgeon.ignore([name for name in left_out if name not in _ignored(surgeon)])
    _leave_out(surgeon, left_out, before_training=True)
    return left_out


def note_kept_embeddings(surgeon: Surgeon, ratio: float) -> None:
    """Say so when kept embeddings (``prune_hidden_size=False``) cap how far a transformer's params can fall."""
    model = surgeon.model
    if surgeon.prune_hidden_size or not attn.find_attention(model):
        return
    tensors = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding)}
    share = sum(tensors.values()) / max(count_params(model), 1)
    if share >= EMBEDDING_NOTE:
        log.info(
            f"HalfPrune keeps the embeddings ({share:.0%} of the params) and the residual stream width they set: at "
            f"ratio {ratio:g} the params can fall by at most about {(1 - share) * ratio:.0%}. "
            "`prune_hidden_size=True` cuts them too."
        )


def drop_failed(
    surgeon: Surgeon, cuts: Sequence[Cut], failed: dict[str, str], left_out: dict[str, str]
) -> list[Cut]:
    """At a prune point: groups the scorer failed on are left out from now on (with a warning), the rest is cut."""
    if not failed:
        return list(cuts)
    left_out.update(failed)
    _leave_out(surgeon, failed, before_training=False)
    return [c for c in cuts if c.layer not in failed]


def cut_safely(
    surgeon: Surgeon, cuts: Sequence[Cut], then: Callable[[ParamRemap, list[Cut]], None], left_out: dict[str, str]
) -> list[Cut]:
    """``surgeon.cut(cuts, then)``, leaving out the groups whose cut breaks the model; returns the cuts made.

    ``then(remap, cuts_made)`` runs once the pruned model is verified (e.g. rebind optimizers, cut EMA copies alike).

    The groups left out are added to ``left_out`` (kept in the callback's state, so a resume leaves them out too).
    """
    cuts, found = list(cuts), {}
    while True:
        try:
            surgeon.cut(cuts, lambda remap, cuts=cuts: then(remap, cuts))
            break
        except SurgeryError as err:
            if not err.groups:
                raise
            culprits = _culprits(surgeon, cuts, err)
        found.update(culprits)
        cuts = [c for c in cuts if c.layer not in culprits]
    left_out.update(found)
    _leave_out(surgeon, found, before_training=False)
    return cuts


def guarded(score: Callable[[Any], Any], surgeon: Surgeon, failed: dict[str, str]) -> Callable[[Any], Any]:
    """The scorer, but a group it fails on (torch-pruning's importance can raise) is recorded in ``failed``.

    Its cuts must then be dropped from the plan (``drop_failed``): the plan falls back to magnitudes for it.
    """
    names = {g.group: g.name for g in surgeon.groups()}

    def guarded(group: Any) -> Any:
        try:
            return score(group)
        except Exception as err:
            failed[names.get(group, "?")] = f"scoring it failed: {type(err).__name__}: {err}"
            return None

    return guarded


def _culprits(surgeon: Surgeon, cuts: Sequence[Cut], err: SurgeryError) -> dict[str, str]:
    """Which of ``cuts`` make the model fail, in few dry runs; the caller dry-runs the rest together again.

    After a broken forward: first the groups it names (those around the layer that failed), then those rooted in
    each module around that layer, inner first; if none of them fails alone, every cut, by halving (a half that
    passes is cleared in one dry run). A group proven to fail takes along the groups at the same place in modules of
    the same class and configuration losing as many channels (``_alike``): their forwards would fail alike, so they
    are not dry-run one by one.
    """
    named = [c for c in cuts if c.layer in err.groups] or list(cuts)
    if len(cuts) == 1 or not isinstance(err, BrokenForward):
        return {c.layer: _reason(err) for c in named}
    found: dict[str, SurgeryError] = {}
    tried, passed = 0, set()
    for suspects in _suspects(cuts, named, err.layer or ""):
        if tried < len(suspects) < len(cuts):
            tried = len(suspects)
            found = _failing(surgeon, suspects, passed)
            if found:
                break
    if not found:
        found = _failing(surgeon, list(cuts), passed, err)
    if not found:  # they fail only together: leave out those it names
        return {c.layer: _reason(err) for c in named}
    return {name: _reason(e) for name, e in found.items()} | _alike(surgeon, cuts, found)


def _suspects(cuts: Sequence[Cut], named: list[Cut], layer: str) -> Iterator[list[Cut]]:
    """The named cuts, then with them those rooted in each module around ``layer``, from the innermost out."""
    yield named
    parts = layer.split(".") if layer else []
    for i in range(len(parts) - 1, 0, -1):
        inside = ".".join(parts[:i]) + "."
        yield [c for c in cuts if c in named or c.layer.startswith(inside)]


def _failing(
    surgeon: Surgeon, cuts: list[Cut], passed: set[tuple[str, ...]], failed: SurgeryError | None = None
) -> dict[str, SurgeryError]:
    """The cuts whose dry run fails on its own, by halving ``cuts`` (``failed``: their dry run together failed).

    ``passed``: the sets of cuts already dry-run without failing (not run again), added to here.
    """
    key = tuple(c.layer for c in cuts)
    if failed is None:
        if key in passed:
            return {}
        check_stop()  # SIGTERM between dry runs (``fit.checks.stop_on_sigterm``)
        try:
            surgeon.cut(cuts, dry_run=True)
            passed.add(key)
            return {}
        except SurgeryError as err:
            failed = err
    if len(cuts) == 1:
        return {cuts[0].layer: failed}
    half = len(cuts) // 2
    return _failing(surgeon, cuts[:half], passed) | _failing(surgeon, cuts[half:], passed)


def _alike(surgeon: Surgeon, cuts: Sequence[Cut], found: dict[str, SurgeryError]) -> dict[str, str]:
    """Cuts like a failing one: at its place in another module of the failing layer's class and configuration.

    The failing group is placed by the innermost module holding both its root and the layer whose forward failed
    (e.g. timm's ``blocks.0.attn``); a group at the same path in a module with the same class, parameter shapes and
    plain attributes, losing as many channels, sees the same shapes in the same code.
    """
    modules = dict(surgeon.model.named_modules())
    by_name = {c.layer: c for c in cuts}
    alike: dict[str, str] = {}
    for name, err in found.items():
        anchor = _common(name, getattr(err, "layer", None) or "")
        if not anchor or anchor not in modules:
            continue
        rest, config = name[len(anchor) + 1 :], _config(modules[anchor])
        for other, module in modules.items():
            c = by_name.get(f"{other}.{rest}")
            if c is None or c.layer in found or c.layer in alike or other == anchor:
                continue
            if len(c.channels) == len(by_name[name].channels) and _config(module) == config:
                alike[c.layer] = (
                    f"left out with {name!r} without a dry run of its own: its {type(module).__name__} is configured "
                    f"alike and would lose as many channels ({_reason(err)})"
                )
    return alike


def _common(a: str, b: str) -> str:
    """The innermost module path holding both ``a`` and ``b`` ('' if only the model does)."""
    common = []
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        common.append(x)
    return ".".join(common) if len(common) < len(a.split(".")) else ".".join(common[:-1])


def _config(module: nn.Module) -> tuple:
    tensors = (*module.named_parameters(), *module.named_buffers())
    plain = (bool, int, float, str)
    attrs = sorted((k, v) for k, v in vars(module).items() if isinstance(v, plain) and not k.startswith("_"))
    return type(module), tuple((n, tuple(t.shape)) for n, t in tensors), tuple(attrs)


def _leave_out(surgeon: Surgeon, groups: dict[str, str], before_training: bool) -> None:
    if not groups:
        return
    surgeon.ignore([name for name in groups if name not in _ignored(surgeon)])
    left = [g.name for g in surgeon.groups() if g.name in surgeon.original_widths]
    names = list(groups)
    reasons = "\n".join(f"  - {name!r}: {why}" for name, why in list(groups.items())[:MAX_LISTED])
    if len(groups) > MAX_LISTED:
        reasons += f"\n  - ... and {len(groups) - MAX_LISTED} more"
    if not left:
        raise SurgeryError(
            f"HalfPrune cannot prune this model safely: no coupled group can be cut without breaking it. "
            f"{'The fit was not started' if before_training else 'Nothing was cut'}; the model is exactly as "
            f"before.\n{reasons}\n`ignored_layers={names}` leaves these layers alone, which here leaves nothing to "
            "prune: the layers that break must become prunable (e.g. torch-pruning told about them with a custom "
            "pruner), or the model cannot be pruned by HalfPrune.",
            names,
        )
    when = "before training" if before_training else "at this prune point"
    log.warn(
        f"HalfPrune leaves {len(names)} coupled group(s) alone for the rest of the fit, found {when}: cutting them "
        f"would break the model (the model was not changed).\n{reasons}\nAdd `ignored_layers={names}` to HalfPrune "
        "to make this explicit and skip this check.",
        category=PreflightWarning,
    )


def _reason(err: SurgeryError) -> str:
    return getattr(err, "reason", None) or str(err)


def _ignored(surgeon: Surgeon) -> set[str]:
    names = {m: n for n, m in surgeon.model.named_modules()}
    return {names.get(m, "") for m in surgeon.ignored_layers}
