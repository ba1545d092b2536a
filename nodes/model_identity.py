"""Which MODEL an inversion was made with, by what changes the model's output: the one rule of every node that
takes an inversion (P2P Edit Sampler, Prompt Mix Sampler).

An inversion (Null-Text, DPL) is only a reconstruction when it is retraced by the model that made it. A LoRA
clone of the base MODEL shares its diffusion model object, so comparing that object alone accepts it silently,
and the edit's source row is then not the image. ``identify(model)`` records what decides the output of a
ComfyUI ``ModelPatcher``:

* **refused when different** (every output changes):
  the model object (``model.model``: another checkpoint or a reload), its latent format, its weight patches
  (``ModelPatcher.patches`` / ``patches_uuid``, which ``add_patches`` (LoRA loaders, merges),
  ``add_weight_wrapper`` and ``set_model_compute_dtype`` renew and ``clone`` keeps), and its object patches
  (``object_patches``: e.g. a ModelSampling node's ``model_sampling``, compared by object);
* **warned when different** (may change the output): the entries of ``model_options`` (CFG functions, UNet
  wrappers, attention patches and replace slots, ``optimized_attention_override``), compared by where they sit
  and what kind of object they are (``clone`` deep-copies them, so object ids mean nothing there). This pack's
  read-only observers (Attention Capture: controllers that never edit, its slot markers and wrappers) do not
  change the output and are left out; the pack's editors (StructureDiffusion's value patch) count.

``check_inversion_model(inv, model, node)`` raises a ``ValueError`` naming what differs and the fix, or logs a
warning naming the differing options. Inversions made before this rule (no identity stored) are not checked.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..attention import logger
from ..attention.controller import AttentionController

IDENTITY_KEY = "model_identity"             # where an Inversion's ``extra`` keeps it
_PACKAGE = __name__.rsplit(".", 2)[0]        # this pack's package name (entries of ours are recognized by it)
_CALLBACKS = "transformer_options.callbacks"   # observe only
_WRAPPERS = "transformer_options.wrappers"     # {wrapper type: {key: [functions]}}, as ModelPatcher.wrappers


@dataclass(frozen=True)
class ModelIdentity:
    """What decides a MODEL's output (see the module docstring)."""

    model: weakref.ref                      # the BaseModel (diffusion model and its loaded weights)
    model_type: str                         # e.g. 'BaseModel (SD15)', for messages
    latent_format: str
    weights: tuple                          # (patches_uuid, patched weights, weight wrappers)
    objects: tuple[tuple[str, int], ...]    # (object patch name, id of the object)
    options: tuple[tuple[str, str], ...]    # (model_options path, kind of object), observers left out

    @property
    def patched_weights(self) -> int:
        return self.weights[1]


def _kind(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"tensor{tuple(obj.shape)}"
    if isinstance(obj, (bool, int, float, str, type(None))):
        return repr(obj)[:60]
    if hasattr(obj, "__qualname__") and hasattr(obj, "__module__"):         # a function or a class
        return f"{obj.__module__}.{obj.__qualname__}"
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _read_only(controller) -> bool:
    """A controller of this pack that only reads attention (Attention Capture's store)."""
    t = type(controller)
    return (isinstance(controller, AttentionController) and controller.edits_probs is False
            and t.edit_qkv is AttentionController.edit_qkv and t.edit_output is AttentionController.edit_output)


def is_observer(obj) -> bool:
    """True for an entry that cannot change the output: ``changes_output = False``; this pack's attention hook (the
    override with ``installs``) whose controllers only read and whose ``previous`` is none or an observer too; this
    pack's slot markers (they record the slot, nothing else)."""
    if getattr(obj, "changes_output", True) is False:
        return True
    t = type(obj)
    if not t.__module__.startswith(_PACKAGE + "."):
        return False
    if t.__name__ in ("SlotMarker", "SlotTracker"):
        return True
    if not isinstance(getattr(obj, "installs", None), tuple):        # not the override hook (AttentionHook)
        return False
    controllers = tuple(i.controller for i in obj.installs)
    previous = getattr(obj, "previous", None)
    return all(_read_only(c) for c in controllers) and (previous is None or is_observer(previous))


def _entries(value, path: str):
    """(path, kind) of every leaf of a model_options tree, observers and bookkeeping left out."""
    if path == _CALLBACKS:
        return
    if path == _WRAPPERS and isinstance(value, dict):
        yield from _wrapper_entries(value, path)
        return
    if isinstance(value, dict):
        for k in sorted(value, key=repr):
            sub = (f"{path}.{k}" if path else k) if isinstance(k, str) else f"{path}[{k!r}]"
            yield from _entries(value[k], sub)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _entries(v, path)
    elif not is_observer(value):
        yield path, _kind(value)


def _wrapper_entries(wrappers: dict, path: str) -> list[tuple[str, str]]:
    """Wrappers ({type: {key: [functions]}}) but this pack's (keys 'attention_lab...': ours reset stores, count
    and prepare our hook's calls; they never change the output)."""
    out = []
    for wtype, by_key in sorted(wrappers.items(), key=lambda kv: repr(kv[0])):
        for key, fns in sorted(by_key.items(), key=lambda kv: repr(kv[0])):
            if isinstance(key, str) and key.startswith("attention_lab"):
                continue
            out += [(f"{path}[{wtype!r}][{key!r}]", _kind(f)) for f in fns]
    return out


def identify(model) -> ModelIdentity:
    """The identity of a ComfyUI MODEL (``ModelPatcher``)."""
    base = model.model
    opts = sorted(list(_entries(getattr(model, "model_options", {}), ""))
                  + _wrapper_entries(getattr(model, "wrappers", {}), "wrappers"))
    return ModelIdentity(
        model=weakref.ref(base),
        model_type=f"{type(base).__name__} ({type(getattr(base, 'model_config', None)).__name__})",
        latent_format=type(base.latent_format).__name__,
        weights=(getattr(model, "patches_uuid", None), len(getattr(model, "patches", {})),
                 sum(len(v) for v in getattr(model, "weight_wrapper_patches", {}).values())),
        objects=tuple(sorted((str(k), id(v)) for k, v in getattr(model, "object_patches", {}).items())),
        options=tuple(opts))


def _patched(n: int) -> str:
    return "no patched weights" if n == 0 else f"{n} patched weights"


def differences(made: ModelIdentity, now: ModelIdentity) -> tuple[list[str], list[str]]:
    """(refusals, warnings): what differs between the model an inversion was made with and ``now``, by name."""
    refuse, warn = [], []
    if made.model() is None or made.model() is not now.model():
        refuse.append(f"the diffusion model itself (inverted with a {made.model_type}, now a {now.model_type}: "
                      f"another checkpoint, or the same one loaded again)")
    if made.latent_format != now.latent_format:
        refuse.append(f"the latent format ({made.latent_format} vs {now.latent_format})")
    if made.weights != now.weights:
        refuse.append(f"the weight patches (LoRA, model merge, weight wrappers, compute dtype): inverted with "
                      f"{_patched(made.patched_weights)}, now {_patched(now.patched_weights)}"
                      + (" (other patches of the same count)" if made.patched_weights == now.patched_weights else ""))
    if made.objects != now.objects:
        names = sorted({n for n, _ in set(made.objects) ^ set(now.objects)})
        refuse.append(f"the object patches {names} (e.g. a ModelSampling node's model_sampling)")
    if sorted(made.options) != sorted(now.options):
        a, b = set(made.options), set(now.options)
        warn = sorted({p for p, _ in a ^ b})
    return refuse, warn


def check_inversion_model(inv, model, node: str) -> None:
    """Refuse (``ValueError``) an inversion made with a MODEL whose output differs from ``model``'s by object,
    latent format, weight patches or object patches; warn, naming them, when only model options differ."""
    made = getattr(inv, "extra", {}).get(IDENTITY_KEY)
    if made is None:
        return
    refuse, warn = differences(made, identify(model))
    if refuse:
        raise ValueError(
            f"{node}: the inversion was made with another MODEL than the one connected here; they differ in "
            f"{'; '.join(refuse)}. Its source row would not reconstruct the image. Connect the same MODEL output "
            f"(e.g. after the LoRA loader) to the inversion node and to {node}, or invert again with this MODEL.")
    if warn:
        logger.warning("%s: the inversion was made with a MODEL whose options differ from this one's in %s (patches "
                       "or wrappers that may change the output, so the source row may not reconstruct the image); "
                       "connect the same MODEL to both nodes if they were not meant to differ", node, ", ".join(warn))
