"""The model zoo's two structure columns (issue 22), read from the fitted model against a fresh copy:

* **attention heads cut**: per attention module HalfPrune recognises (``core.attention.find_attention``), whether
  its heads went (``yes``), only its head dims (``no, head dims``: heads locked, e.g. T5's shared bias), or nothing
  (``left out``, with the reason HalfPrune gave: an ambiguous fused layout, a group left out at pre-flight, a
  warning naming the module); attention-like modules it does not recognise, ``nn.MultiheadAttention`` (cut by
  torch-pruning's own pruner) and recurrent layers' hidden sizes are named too.
* **residual stream kept**: the widths of the stream's layers (``core.residual.stream_modules``: attention outputs,
  embeddings and norms at the hidden size; without recognised attention, embeddings and norms at a config's hidden
  size; ``nn.MultiheadAttention``'s embedding) before and after.

Also the pre-flight timer and the warnings recorder the zoo's child process installs.
"""

from __future__ import annotations

import time
import warnings


def record_warnings() -> list[str]:
    """Every later warning that mentions HalfPrune or comes from its package, appended as text (once each)."""
    caught: list[str] = []

    def keep(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if ("lightning_halfprune" in str(filename) or "HalfPrune" in text) and text not in caught:
            caught.append(text)

    warnings.showwarning = keep
    warnings.simplefilter("always")
    return caught


def time_preflight() -> list[float]:
    """The seconds of each pre-flight run from now on (the callback's module-level ``preflight`` is wrapped)."""
    import lightning_halfprune.callback as cb

    seconds: list[float] = []
    original = cb.preflight

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    cb.preflight = timed
    return seconds


def _attention_like(module) -> bool:
    from torch import nn

    name = type(module).__name__.lower()
    if isinstance(module, nn.MultiheadAttention) or not ("attention" in name or name.endswith("attn")):
        return False
    return any(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in module.modules())


def _related(name: str, others) -> bool:
    return any(name == o or name.startswith(o + ".") or o.startswith(name + ".") for o in others)


def _unrecognised(fresh, model, names) -> str | None:
    """Attention-like modules HalfPrune does not recognise, and how many of their projections the graph cut."""
    from torch import nn

    from lightning_halfprune.core.layers import out_width

    found = [(n, m) for n, m in fresh.named_modules() if _attention_like(m) and not _related(n, names)]
    if not found:
        return None
    after, seen, total, cut = dict(model.named_modules()), set(), 0, 0
    for n, m in found:
        for cn, c in m.named_modules():
            if isinstance(c, (nn.Linear, nn.Conv1d, nn.Conv2d)) and id(c) not in seen:
                seen.add(id(c))
                total += 1
                cut += out_width(c) != out_width(after.get(f"{n}.{cn}" if cn else n))
    classes = ", ".join(sorted({type(m).__name__ for _, m in found})[:3])
    return f"not recognised: {classes} x{len(found)}, {cut}/{total} of their projections cut by the graph"


def heads_column(fresh, model, left_out: dict, caught: list[str]) -> str:
    """yes / no / left out, with counts and the reason."""
    from torch import nn

    from lightning_halfprune.core import attention as attn
    from lightning_halfprune.core import mla

    before = attn.find_attention(fresh)
    after = {s.name: s for s in attn.find_attention(model)}
    mods = dict(model.named_modules())
    latent = mla.find(fresh)  # multi-head latent attention: heads counted from the modules themselves
    names = {s.name for s in before} | {m.name for m in latent}
    other = _unrecognised(fresh, model, names)
    notes = []
    if latent:
        h0 = sum(mla.width(m.module) for m in latent)
        h1 = sum(mla.width(mods[m.name]) or 0 for m in latent if m.name in mods)
        notes.append(f"MLA: {h0} -> {h1} heads over {len(latent)} modules")
    mha = [(n, m) for n, m in fresh.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if mha:
        n, m = mha[0]
        now = mods.get(n)
        notes.append(
            f"nn.MultiheadAttention x{len(mha)}: {m.num_heads} heads kept, head dim {m.head_dim} -> "
            f"{getattr(now, 'head_dim', '?')} (torch-pruning's own pruner)"
        )
    rnn = [(n, m) for n, m in fresh.named_modules() if isinstance(m, nn.RNNBase)]
    if rnn:
        cut = ", ".join(f"{type(m).__name__} {m.hidden_size} -> {getattr(mods.get(n), 'hidden_size', '?')}"
                        for n, m in rnn[:2])
        notes.append(f"recurrent hidden size {cut}")
    if other:
        notes.append(other)
    if not before:
        return "; ".join((["no attention"] if not (other or mha or latent) else []) + notes)
    hb = sum(s.num_heads for s in before)
    ha = sum(after[s.name].num_heads for s in before if s.name in after)
    cut = [s for s in before if s.name in after and after[s.name].num_heads < s.num_heads]
    dims = [s for s in before if s.name in after and after[s.name].num_heads == s.num_heads
            and after[s.name].head_dim < s.head_dim]
    kept = [s for s in before if s.name in after and after[s.name].num_heads == s.num_heads
            and after[s.name].head_dim == s.head_dim]
    missing = [s for s in before if s.name not in after]
    parts = []
    if cut:
        parts.append(f"yes: {len(cut)}/{len(before)} modules, {hb} -> {ha} heads")
    if dims:
        s = dims[0]
        why = f" ({s.locked.split(',')[0]})" if s.locked else ""
        parts.append(f"no, head dims {s.head_dim} -> {after[s.name].head_dim} in {len(dims)}/{len(before)}{why}")
    if kept:
        why = _why_kept(kept[0], left_out, caught)  # the first kept module's reason
        parts.append(f"{'left out' if why else 'no'} in {len(kept)}/{len(before)}: {why or 'kept, no reason given'}")
    if missing:
        parts.append(f"{len(missing)}/{len(before)} no longer recognised after the fit")
    return "; ".join(parts + notes)


def _why_kept(spec, left_out: dict, caught: list[str]) -> str | None:
    if spec.uncut:
        return spec.uncut
    for key in (spec.root_name, spec.name):
        if key in left_out:
            said = left_out[key]
            hint = said.find("its forward ")  # the reason in words, not torch's reshape message
            return f"left out at pre-flight: {said[hint:].split(':')[0] if hint >= 0 else said[:100]}"
    if spec.units <= 1:
        return "one head (or key/value group), which a module always keeps"
    quoted = (f"'{spec.name}'", f"'{spec.root_name}'")
    said = [line for w in caught for line in w.splitlines() if any(q in line for q in quoted)]
    return said[0].strip()[:120] if said else None


def _width(module):
    from torch import nn

    from lightning_halfprune.core import residual
    from lightning_halfprune.core.attention import out_width

    if module is None:
        return None
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim
    if residual.is_norm(module):
        return residual.norm_width(module)
    return out_width(module)


def _config_widths(model) -> set[int]:
    from torch import nn

    widths = set()
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is None or isinstance(config, nn.Module):
            continue
        for n in ("hidden_size", "d_model", "n_embd", "dim"):
            value = getattr(config, n, None)
            if isinstance(value, int) and not isinstance(value, bool):
                widths.add(value)
    return widths


def residual_column(fresh, model) -> str:
    """``yes (width)``, ``no: ...`` with the widths, or ``n/a`` when the model has no residual stream found."""
    from torch import nn

    from lightning_halfprune.core import attention as attn
    from lightning_halfprune.core import residual

    stream = set(residual.stream_modules(fresh, attn.find_attention(fresh)))
    if not stream:  # no attention recognised: embeddings and norms at a config's hidden size (Mamba), MHA models
        widths = _config_widths(fresh)
        stream = {m for m in fresh.modules() if (isinstance(m, nn.Embedding) or residual.is_norm(m))
                  and _width(m) in widths}
        stream |= {m for m in fresh.modules() if isinstance(m, nn.MultiheadAttention)}
    if not stream:
        return "n/a (no attention, no hidden size)"
    names = {m: n for n, m in fresh.named_modules()}
    after = dict(model.named_modules())
    changed = [(names[m], _width(m), _width(after.get(names[m]))) for m in stream]
    changed = [c for c in changed if c[1] != c[2]]
    if not changed:
        return f"yes ({', '.join(str(w) for w in sorted({_width(m) for m in stream}))})"
    name, w0, w1 = sorted(changed)[0]
    return f"no: {len(changed)}/{len(stream)} layers cut, e.g. {name} {w0} -> {w1}"
