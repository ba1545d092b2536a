"""The pack's attention hook: one ``optimized_attention_override`` that hands every attention call to controllers.

ComfyUI 0.8 (``comfy/ldm/modules/attention.py`` ``wrap_attn``) calls ``transformer_options
["optimized_attention_override"](func, q, k, v, heads, ..., transformer_options=..., _inside_attn_wrapper=True)``
instead of its attention kernel ``func`` whenever that key is set, for the UNets (``CrossAttention``), Flux and
SD3 alike. ``AttentionHook`` is that override. It never takes an attn1/attn2 replace slot, so other packs
(IPAdapter, InstantID, PuLID: one replace object per slot on which they call ``.add``) keep theirs.

Contract (what a model, ComfyUI's or a pure-torch one such as ShapesWorld's UNet, must do):

* **UNet layers.** Call every ``patches["attn1_patch"]`` / ``["attn2_patch"]`` entry as
  ``p(n, context, value, extra_options)`` right before the self-/cross-attention of a block (as
  ``BasicTransformerBlock`` does), with ``extra_options["block"] = (kind, number)`` and ``["block_index"]``; then
  call the override with ``transformer_options`` holding the same ``block`` / ``block_index`` (plus
  ``cond_or_uncond``, ``sigmas``, ``sample_sigmas``, ``activations_shape``). Our ``SlotMarker`` entries record
  which slot runs next, so self- and cross-attention are told apart by the model's own call order, never by
  token counts. q, k, v: (b, n, heads*d), ComfyUI's layout (``explicit.py``).
* **DiT blocks** (Flux double/single, SD3 joint): see ``joint.py``.
* **Another pack's replace slot.** A layer whose attn1/attn2 slot holds another pack's replace function does not
  call the override unless that function does (IPAdapter's does not). ``with_foreign_slots`` (run per model call,
  on that call's copy of the options: the MODEL keeps the other pack's object) puts a ``SlotProxy`` in front of
  it that runs our controllers around the other pack's function: readers see exactly the probabilities of the
  q, k it receives and the output stays theirs; a controller that edits probabilities gets
  ``edited + (theirs - plain attention)``, i.e. the other pack's contribution is kept as its difference to plain
  attention (exact for packs that add a term, as IPAdapter-style packs do). An object with
  ``attention_lab_opaque = True`` (SpaText's regional pass) is left alone: our controllers do not see that call.
* **Another override.** The hook found on the model is ``previous`` and stays the fast path; a call that needs
  explicit probabilities composes with it the same way. An override installed after ours must call the one it
  found (ComfyUI's convention); while it runs ours, ``transformer_options[INSIDE_KEY]`` tells our deeper hooks to
  pass through.

transformer_options keys: ``OVERRIDE_KEY`` (the override, ours or a chain around it), ``HOOK_KEY`` (our hook,
for the per-call preparation), ``patches`` attn1/attn2 lists holding our ``SlotMarker``s, ``INSIDE_KEY``,
``store.QUIET_KEY`` (helper evaluations stores skip), ``joint.LAYOUT_KEY`` / ``joint.BLOCK_KEY`` (DiT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .calls import split_args, warn_once
from .context import context_from_extra_options
from .controller import AttentionController, AttentionFn, run_attention
from .explicit import sdpa_attention, sdpa_kernel
from .joint import BLOCK_KEY as DIT_BLOCK_KEY
from .joint import dit_call
from .layers import LayerId

OVERRIDE_KEY = "optimized_attention_override"
HOOK_KEY = "attention_lab_hook"
INSIDE_KEY = "attention_lab_inside"
OPAQUE_ATTR = "attention_lab_opaque"
@dataclass(frozen=True)
class Install:
    """One controller on a set of layers; ``self_attn`` / ``cross_attn`` pick the UNet slots (on a DiT joint call
    they pick the image->image and image->text views)."""
    controller: AttentionController
    layers: frozenset[LayerId]
    self_attn: bool = True
    cross_attn: bool = True


class SlotTracker:
    """Which attention of which UNet block runs next: ("attn1" | "attn2", (kind, number), block_index)."""

    def __init__(self):
        self.slot = None

    def __deepcopy__(self, memo):
        return self


class SlotMarker:
    """An attn1_patch / attn2_patch entry that records the slot about to run and changes nothing."""

    def __init__(self, tracker: SlotTracker, slot: str):
        self.tracker, self.slot = tracker, slot

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        block = extra_options.get("block")
        self.tracker.slot = (self.slot, None if block is None else (block[0], int(block[1])),
                             int(extra_options.get("block_index", 0)))
        return n, context, value


class AttentionHook:
    """ComfyUI's ``optimized_attention_override``: dispatches each call to the controllers of its layer.

    ``installs``: controllers with their layers, in install order (their composition order). ``previous``: the
    override that was on the model (called as the fast path). ``kernel(q, k, v, heads)``: plain attention in
    ComfyUI's (b, n, h*d) layout for ``SlotProxy`` (ComfyUI's optimized attention there, SDPA outside).
    ``dit``: the DiT model's block table (``joint.DitInfo``) for the glue's per-call preparation, None for UNets
    (DiT calls are recognized by their keys either way). Immutable; survives
    ``copy.deepcopy`` of model options as itself (a store reached through it stays the one the user wired).
    """

    def __init__(self, installs: Sequence[Install] = (), previous: Callable | None = None,
                 kernel: AttentionFn | None = None, tracker: SlotTracker | None = None, dit=None):
        self.installs = tuple(installs)
        self.previous = previous
        self.kernel = kernel or sdpa_attention
        self.tracker = tracker or SlotTracker()
        self.dit = dit
        self._by_layer: dict = {}

    def __deepcopy__(self, memo):
        return self

    def with_install(self, install: Install) -> "AttentionHook":
        return AttentionHook(self.installs + (install,), self.previous, self.kernel, self.tracker, self.dit)

    def controllers(self, layer: LayerId, is_cross: bool) -> tuple[AttentionController, ...]:
        key = (layer, is_cross)
        if key not in self._by_layer:
            self._by_layer[key] = tuple(i.controller for i in self.installs if layer in i.layers
                                        and (i.cross_attn if is_cross else i.self_attn))
        return self._by_layer[key]

    def layers(self, is_cross: bool) -> set[LayerId]:
        return {lid for i in self.installs if (i.cross_attn if is_cross else i.self_attn) for lid in i.layers}

    def markers(self) -> dict[str, SlotMarker]:
        return {"attn1_patch": SlotMarker(self.tracker, "attn1"), "attn2_patch": SlotMarker(self.tracker, "attn2")}

    # ------------------------------------------------------------------ the override
    def forward(self, func: Callable, args: tuple, kwargs: dict):
        """The call as it would run without our controllers: ``previous`` (told that we are inside) or ``func``."""
        if self.previous is None:
            return func(*args, **kwargs)
        to = kwargs.get("transformer_options")
        inner = dict(kwargs, transformer_options={**(to or {}), INSIDE_KEY: True})
        return self.previous(func, *args, **inner)

    def __call__(self, func: Callable, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        if to.get(INSIDE_KEY):
            return self.forward(func, args, kwargs)
        if "block" in to:
            return self._unet_call(func, args, kwargs, to)
        if DIT_BLOCK_KEY in to or to.get("block_type") in ("double", "single"):
            return dit_call(self, func, args, kwargs, to)
        return self.forward(func, args, kwargs)

    def _unet_call(self, func, args, kwargs, to):
        block, index = to["block"], int(to.get("block_index", 0))
        slot = self.tracker.slot
        if slot is None or slot[1] != (block[0], int(block[1])) or slot[2] != index:
            warn_once(("marker", tuple(block), index), "attention hook: no slot marker ran before the attention of "
                      "block %s depth %d (its model does not call attn1_patch/attn2_patch); its attention is not "
                      "observed", tuple(block), index)
            return self.forward(func, args, kwargs)
        layer, is_cross = LayerId(str(block[0]), int(block[1]), index), slot[0] == "attn2"
        controllers = self.controllers(layer, is_cross)
        if not controllers:
            return self.forward(func, args, kwargs)
        q, k, v, heads, mask, skip, skip_out = split_args(args, kwargs)
        if mask is not None or skip or skip_out:
            warn_once(("layout", layer, is_cross), "attention hook: %s %s attention came with a mask or another "
                      "layout; it is not observed", layer, "cross" if is_cross else "self")
            return self.forward(func, args, kwargs)
        ctx = context_from_extra_options(to, is_cross, q, heads=heads)
        rest = args[3:]

        def base(q_, k_, v_):
            return self.forward(func, (q_, k_, v_) + rest, kwargs)
        plain = None if self.previous is None else (lambda q_, k_, v_: func(q_, k_, v_, *rest, **kwargs))
        return run_attention(q, k, v, ctx, controllers, base, plain)


class SlotProxy:
    """Per-call stand-in for another pack's attn1/attn2 replace function (see the module docstring)."""

    attention_lab_opaque = True

    def __init__(self, foreign: Callable, hook: AttentionHook, is_cross: bool):
        self.foreign, self.hook, self.is_cross = foreign, hook, is_cross

    def __call__(self, q, k, v, extra_options):
        ctx = context_from_extra_options(extra_options, self.is_cross, q)
        controllers = self.hook.controllers(ctx.layer, self.is_cross)
        inner = {**extra_options, INSIDE_KEY: True}
        foreign, kernel, heads = self.foreign, self.hook.kernel, ctx.heads
        return run_attention(q, k, v, ctx, controllers, lambda q_, k_, v_: foreign(q_, k_, v_, inner),
                             lambda q_, k_, v_: kernel(q_, k_, v_, heads))


def with_foreign_slots(to: dict, hook: AttentionHook | None = None) -> dict:
    """``to`` for one model call, with a ``SlotProxy`` in front of every other pack's attn1/attn2 replace function
    on a layer our controllers watch (``to`` itself and the MODEL's options are not changed)."""
    hook = hook or to.get(HOOK_KEY)
    replace = to.get("patches_replace") or {}
    if hook is None or not (replace.get("attn1") or replace.get("attn2")):
        return to
    new_replace, taken = dict(replace), []
    for name, is_cross in (("attn1", False), ("attn2", True)):
        slots = replace.get(name)
        if not slots:
            continue
        new = dict(slots)
        for lid in sorted(hook.layers(is_cross)):
            key = (lid.kind, lid.number, lid.depth)
            foreign = slots.get(key) or slots.get((lid.kind, lid.number))
            if foreign is None or getattr(foreign, OPAQUE_ATTR, False):
                continue
            new[key] = SlotProxy(foreign, hook, is_cross)
            taken.append((name, str(lid), type(foreign).__name__))
        new_replace[name] = new
    if taken:
        warn_once(tuple(taken), "attention hook: these attention slots belong to another pack's replace function; our "
                  "controllers run around it (its output kept; a probability edit adds its difference to plain "
                  "attention): %s",
                  ", ".join(f"{lid} {name} ({kind})" for name, lid, kind in taken))
    return {**to, "patches_replace": new_replace}


def hook_options(self_controllers: Sequence[AttentionController] = (),
                 cross_controllers: Sequence[AttentionController] = (), layers: Sequence[LayerId] = (),
                 kernel: AttentionFn | None = None) -> dict:
    """transformer_options entries putting the controllers on ``layers`` of a pure-torch UNet (ShapesWorld's):
    the hook under ``OVERRIDE_KEY`` / ``HOOK_KEY`` and its two slot markers. Merge with ``merge_options``."""
    hook = AttentionHook(kernel=kernel)
    ids = frozenset(layers)
    for c in self_controllers:
        hook = hook.with_install(Install(c, ids, True, False))
    for c in cross_controllers:
        hook = hook.with_install(Install(c, ids, False, True))
    return {OVERRIDE_KEY: hook, HOOK_KEY: hook, "patches": {k: [m] for k, m in hook.markers().items()}}


def merge_options(base: dict, extra: dict) -> dict:
    """A new dict: ``base`` with ``extra`` merged in (nested dicts merged, lists concatenated, other values of
    ``extra`` win)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_options(out[k], v)
        elif isinstance(v, list) and isinstance(out.get(k), list):
            out[k] = out[k] + v
        else:
            out[k] = v
    return out


def call_attention(func: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   transformer_options: dict | None = None, **kwargs) -> torch.Tensor:
    """What ComfyUI's ``wrap_attn`` does, for pure-torch models: the override when ``transformer_options`` has
    one, else ``func(q, k, v, heads, **kwargs)``."""
    to = transformer_options or {}
    if OVERRIDE_KEY in to:
        return to[OVERRIDE_KEY](func, q, k, v, heads, transformer_options=to, _inside_attn_wrapper=True, **kwargs)
    return func(q, k, v, heads, transformer_options=to, **kwargs)


__all__ = ["AttentionHook", "HOOK_KEY", "INSIDE_KEY", "Install", "OPAQUE_ATTR", "OVERRIDE_KEY", "SlotMarker",
           "SlotProxy", "SlotTracker", "call_attention", "hook_options", "merge_options", "sdpa_kernel",
           "split_args", "with_foreign_slots"]
