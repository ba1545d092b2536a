"""Direct Inversion (Ju et al., "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of Code", ICLR 2024)
in k-diffusion sigma space.

Upstream: https://github.com/cure-lab/PnPInversion at commit 07f97f448150e2ca220bebd54c8f687c5c50c67a, method
"directinversion+p2p" of ``models/p2p_editor.py``: ``DirectInversion.invert`` / ``offset_calculate`` in
``models/p2p/inversion.py`` and ``direct_inversion_p2p_guidance_forward`` / ``..._diffusion_step`` in
``models/p2p/p2p_guidance_forward.py``. The repository states no licence for this code (no LICENSE at its root
nor in models/p2p/, none named in its README; only the vendored models/InstructDiffusion and models/instructpix2pix
carry their own), so nothing of it is copied: this module is our own code for the procedure described below, and
``tests/test_direct_inversion.py`` checks it against those functions' formulas written out in our own words.

The procedure, as upstream runs it with Prompt-to-Prompt:

1. DDIM inversion of the image under the source prompt alone (guidance 1), as Null-Text Inversion
   (``inversion.ddim_invert``): the trajectory x_T = traj[0], ..., traj[N] = x_0.
2. The offset pass, from x_T down, no attention control: per step i the guided DDIM step (guidance g, the empty
   prompt as the null) of the source branch's state x gives rec_i; its offset to the trajectory is
   d_i = traj[i+1] - rec_i, and the state goes on from rec_i + d_i (= traj[i+1] up to rounding; upstream's
   arithmetic kept). The last state is the reconstruction the edit's source branch retraces.
3. The edit: the P2P batch [source, edits] from x_T with the same guidance and null; after each DDIM step the
   source row (only) gets + d_i, *before* LocalBlend (upstream's ``controller.step_callback`` runs after the
   addition). The edited rows are never corrected: the source branch keeps the image, the target branches
   edit freely ("disentangling the two branches").

Departures: upstream's offset pass also runs the target prompt on the trajectory (batch [source, target]); those
offsets are used only by its "add-target" ablation, so only the source row is computed here (the same source
offsets, half the model evaluations). Sigma space as ``inversion.py``: x = z / sqrt(alphabar), so every offset is
upstream's z-space offset times sqrt(1 + sigma_{i+1}^2); the time grid's departure (last sigma 0) is the one
documented for NTI in docs/faithful-ports.md. Not upstream (it has no noise mask): the nodes multiply the offsets
by a noise mask of the edit, whose outside the inpainting keeps equal to the image (nodes/inversion.py).

Shapes (einops legend): b batch rows (images inverted together; one edit's source row: 1), c latent channels,
h w latent size, m tokens, d width;
trajectory[i] (b, c, h, w); offsets[i] (b, c, h, w), one per sampling step.
"""

from __future__ import annotations

from typing import Callable

import torch

from .p2p import BatchEps, p2p_sample

AfterStep = Callable[[int, torch.Tensor], torch.Tensor]     # (step index, x (rows, c, h, w)) -> x


class OffsetRecorder:
    """After-step hook of the offset pass: records d_i = traj[i+1] - x and continues from x + d_i (upstream's
    ``loss = latent_prev - latents_prev_rec``; ``latent_cur = latents_prev_rec + loss``)."""

    def __init__(self, trajectory: list[torch.Tensor]):
        self.trajectory = trajectory
        self.offsets: list[torch.Tensor] = []

    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor:
        d = self.trajectory[i + 1].to(x) - x
        self.offsets.append(d)
        return x + d


@torch.no_grad()
def direct_offsets(eps: BatchEps | None, trajectory: list[torch.Tensor], sigmas: torch.Tensor, cond: torch.Tensor,
                   null: torch.Tensor, guidance: float, on_step: Callable[[int], None] | None = None,
                   **sample_kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Step 2 of the module docstring: the per-step offsets of the source branch and its last state.

    ``eps(x, sigma, context, cond_or_uncond)`` is the batch eps of ``p2p.p2p_sample`` (the same loop the edit
    runs, so the source row of the edit sees what this pass saw); ``trajectory`` from ``ddim_invert`` (N+1
    states (b, c, h, w), [0] = x_T: b images inverted with one prompt, each row its own source branch, row-wise
    independent); ``cond`` (1, m, d) the source prompt; ``null`` (1, m, d) the null context the edit will
    use (upstream: the empty prompt); ``guidance`` the edit's guidance (upstream 7.5). ``sample_kwargs`` go to
    ``p2p_sample`` (e.g. a ``guide``). Returns N offsets (b, c, h, w) and the reconstruction (b, c, h, w).
    Costs N guided evaluations (2Nb rows)."""
    recorder = OffsetRecorder(trajectory)
    rows = cond.expand(trajectory[0].shape[0], -1, -1)       # b images: every row is a source branch
    x = p2p_sample(eps, trajectory[0], sigmas, rows, null, guidance, recorder, on_step, **sample_kwargs)
    return recorder.offsets, x


class SourceCorrection:
    """After-step hook of the edit: the source row (item 0 of the batch) gets the step's offset, then ``then``
    (LocalBlend, or None) runs, as upstream's ``direct_inversion_p2p_guidance_diffusion_step``."""

    def __init__(self, offsets: list[torch.Tensor], then: AfterStep | None = None):
        self.offsets, self.then = offsets, then

    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:1] + self.offsets[i].to(x), x[1:]])
        return x if self.then is None else self.then(i, x)
