"""A small CNN that names the shape and colour of the object inside a region.

Input: an image (3, S, S) in [0, 1] and a region mask (S, S); the network sees the image
masked to the (dilated) region plus the mask itself. Trained on the generator with blur
and noise so it also reads the model's imperfect renderings.

    python -m attention.shapesworld.classifier --out my_classifier.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .. import cli
from .world import COLOURS, SHAPES, ShapesWorld

log = logging.getLogger("attention_lab.classifier")


class RegionClassifier(nn.Module):
    def __init__(self, width: int = 48):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(4, w, 3, padding=1), nn.GELU(), nn.Conv2d(w, w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(), nn.AdaptiveMaxPool2d(1))
        self.shape_head = nn.Linear(2 * w, len(SHAPES))
        self.colour_head = nn.Linear(2 * w, len(COLOURS))

    @staticmethod
    def prepare(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images and (B, S, S) masks -> (B, 4, S, S) network input."""
        m = F.max_pool2d(masks.float()[:, None], 3, 1, 1)  # dilate by one pixel
        return torch.cat([images * m, m], dim=1)

    def forward(self, images, masks):
        f = self.features(self.prepare(images, masks)).flatten(1)
        return self.shape_head(f), self.colour_head(f)

    @torch.no_grad()
    def predict(self, images, masks) -> tuple[list[str], list[str]]:
        s, c = self(images, masks)
        cols = list(COLOURS)
        return [SHAPES[i] for i in s.argmax(-1).tolist()], [cols[i] for i in c.argmax(-1).tolist()]


def _batch(world: ShapesWorld, n: int, augment: bool):
    images, masks, shapes, colours = [], [], [], []
    cols = list(COLOURS)
    for _ in range(n):
        scene = world.sample()
        k = int(torch.randint(len(scene.objects), (), generator=world.gen))
        ob = scene.objects[k]
        images.append(scene.image), masks.append(ob.mask)
        shapes.append(SHAPES.index(ob.shape)), colours.append(cols.index(ob.colour))
    x = torch.stack(images)
    m = torch.stack(masks)
    if augment:
        blur = torch.rand(n, 1, 1, 1, generator=world.gen) * 0.6
        x = x * (1 - blur) + F.avg_pool2d(x, 3, 1, 1) * blur
        x = (x + 0.05 * torch.randn(x.shape, generator=world.gen)).clamp(0, 1)
    return x, m, torch.tensor(shapes), torch.tensor(colours)


def train(steps: int, seed: int, device: str) -> tuple[RegionClassifier, dict]:
    torch.manual_seed(seed)
    net = RegionClassifier().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    world = ShapesWorld(seed=seed)
    for step in range(steps):
        x, m, s, c = (t.to(device) for t in _batch(world, 128, augment=True))
        ls, lc = net(x, m)
        loss = F.cross_entropy(ls, s) + F.cross_entropy(lc, c)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0:
            log.info("classifier step %d loss %.4f", step + 1, float(loss))
    net.eval()
    x, m, s, c = (t.to(device) for t in _batch(ShapesWorld(seed=seed + 999), 2000, augment=False))
    ps, pc = net(x, m)
    acc = {"shape_accuracy": float((ps.argmax(-1) == s).float().mean()),
           "colour_accuracy": float((pc.argmax(-1) == c).float().mean()), "held_out": 2000}
    return net, acc


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, "attention.shapesworld.classifier")
    p.add_argument("--out", type=cli.output_file, default="shapes_classifier_trained.safetensors",
                   help="weights file to write (the harness reads the shipped assets/shapes_classifier.safetensors)")
    cli.add_overwrite_shipped(p)
    p.add_argument("--steps", type=cli.int_range(1), default=1500, help="training steps")
    p.add_argument("--seed", type=cli.int_range(0), default=1, help="seed of the generator and the weights")
    p.add_argument("--device", type=cli.device, default="cpu", help="torch device (cpu, cuda, cuda:N, mps)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    cli.refuse_shipped(p, args.out, args.overwrite_shipped)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    net, acc = train(args.steps, args.seed, args.device)
    log.info("held-out accuracy: %s", acc)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, args.out,
              metadata={"accuracy": json.dumps(acc), "steps": str(args.steps)})


if __name__ == "__main__":
    main()
