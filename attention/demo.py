"""The Attention Lab demo: every pipeline of the pack on ShapesWorld, on a CPU.

    .venv/bin/python -m attention.demo --out demo_output [--quick] [--sections capture spatext]

Runs the sections below in order, each through the same code as the ComfyUI nodes, and writes PNGs and
``report.md`` into the output folder. The report is rewritten after every section, so a run stopped
with Ctrl-C (or killed) leaves a readable report of the sections that finished. Progress goes to the
terminal: one line per section with its time, and while a section runs a line counting its UNet
evaluations, a bar when the count is known (``progress.json`` in the output folder keeps each finished
section's count, so a second run into the same folder shows bars for all of them).

Adding a section: write ``attention/demo_<name>.py`` with a function
``(model, out_folder, save, quick) -> list of markdown lines`` (its own ``## heading``; every PNG it
saves linked from its lines) and add one ``Section(...)`` line to ``SECTIONS``.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import cli

log = logging.getLogger("attention_lab.demo")


@dataclass(frozen=True)
class Section:
    name: str                          # --sections key and anchor in the report
    title: str                         # shown in the progress lines and the report's contents
    function: str | Callable           # "module:function" inside attention/ (imported when the section runs)
    calls: tuple[int, int] | None = None   # UNet evaluations of a measured run (--quick, full): the bar's 100 %


SECTIONS = (
    Section("samples", "Text to image", "demo_capture:samples_section", (20, 20)),
    Section("capture", "Attention capture and clustering", "demo_capture:capture_section", (20, 20)),
    Section("mnm", "Prompt mixing (MnM)", "demo_editing:mnm_section"),
    Section("p2p", "Null-Text Inversion and Prompt-to-Prompt", "demo_editing:p2p_section"),
    Section("dpl", "Dynamic Prompt Learning", "demo_dpl:dpl_section"),
    Section("structure", "StructureDiffusion", "demo_structure:structure_section"),
    Section("spatext", "SpaText (training-free)", "demo_spatext:spatext_section"),
    Section("grounding", "Grounded generation", "demo_grounding:grounding_section"),
    Section("quality", "Quality harness", "demo_quality:quality_section"),
)
COUNTS = "progress.json"   # in the output folder: each finished section's UNet calls, the bars' 100 % next time


def save(images, path: Path, scale: int = 4) -> None:
    """(H, W, 3) or (1, H, W, 3) in [0, 1] -> PNG, nearest-upscaled."""
    from PIL import Image
    img = images[0] if images.dim() == 4 else images
    pil = Image.fromarray((img.clamp(0, 1) * 255).round().byte().cpu().numpy())
    pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(path)


class Progress:
    """Counts UNet evaluations of one section (a forward hook) and shows them as a bar on the terminal.

    On a terminal the bar is redrawn in place at most 5 times a second; otherwise (a log file) a line is
    written every 30 s. ``expected`` None: a count without a percentage."""

    def __init__(self, label: str, expected: int | None, stream=None):
        self.label, self.expected = label, expected
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.calls, self.t0, self.shown = 0, time.perf_counter(), 0.0
        self.width = max(40, shutil.get_terminal_size((120, 24)).columns - 1)

    def hook(self, module, inputs, output) -> None:
        self.calls += 1
        now = time.perf_counter()
        if now - self.shown >= (0.2 if self.tty else 30.0):
            self.shown = now
            self.draw(now)

    def text(self, now: float) -> str:
        secs = now - self.t0
        clock = f"{int(secs) // 60}:{int(secs) % 60:02d}"
        if not self.expected:
            return f"{self.label}  {self.calls:,} UNet calls  {clock}"
        frac = min(self.calls / self.expected, 0.99)
        bar = "#" * int(frac * 24) + "-" * (24 - int(frac * 24))
        return f"{self.label}  [{bar}] ~{frac:.0%}  {self.calls:,} UNet calls  {clock}"

    def draw(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r" + self.text(now)[:self.width].ljust(self.width))
        else:
            self.stream.write(self.text(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


class Report:
    """report.md, rewritten whole after each section (write to a temporary file, then rename)."""

    def __init__(self, out: Path, head: list[str], planned: list[Section]):
        self.path, self.head, self.planned = out / "report.md", head, planned
        self.done: dict[str, tuple[list[str], float, int]] = {}
        self.state: dict[str, str] = {}   # sections not done: "running", "interrupted", "failed: ..."

    def write(self, status: str) -> None:
        rows = ["| | section | time | UNet calls |", "|---|---|---|---|"]
        for i, s in enumerate(self.planned, 1):
            if s.name in self.done:
                _, secs, calls = self.done[s.name]
                rows.append(f"| {i} | [{s.title}](#{s.name}) | {secs:.1f} s | {calls:,} |")
            else:
                rows.append(f"| {i} | {s.title} | {self.state.get(s.name, 'not run')} | |")
        body = []
        for s in self.planned:
            if s.name in self.done:
                lines, secs, calls = self.done[s.name]
                body += [f'<a id="{s.name}"></a>', "", *lines,
                         f"*Section time {secs:.1f} s, {calls:,} UNet evaluations.*", ""]
        text = "\n".join(self.head + [f"**{status}**", ""] + rows + [""] + body) + "\n"
        tmp = self.path.with_suffix(".md.tmp")
        tmp.write_text(text)
        tmp.replace(self.path)


def unlinked_images(out: Path, before: dict[str, float], lines: list[str]) -> list[str]:
    """PNGs written or rewritten since ``before`` (name -> mtime) that ``lines`` do not link."""
    text = "\n".join(lines)
    return sorted(p.name for p in out.glob("*.png")
                  if before.get(p.name) != p.stat().st_mtime and f"]({p.name})" not in text)


def run_section(section: Section, index: int, total: int, model, out: Path, quick: bool, known: dict):
    """(markdown lines, seconds, UNet calls) of one section, with its progress bar (``known``: calls counted
    by an earlier run into the same folder; else the section's measured ``calls``; else a bare count)."""
    fn = section.function
    if isinstance(fn, str):
        module, _, attr = fn.partition(":")
        fn = getattr(importlib.import_module(f".{module}", __package__), attr)
    expected = known.get(section.name) or (section.calls[0 if quick else 1] if section.calls else None)
    progress = Progress(f"[{index}/{total}] {section.title}", expected)
    before = {p.name: p.stat().st_mtime for p in out.glob("*.png")}
    handle = model.unet.register_forward_hook(progress.hook)
    try:
        lines = fn(model, out, save, quick)
    finally:
        handle.remove()
        progress.close()
    secs = time.perf_counter() - progress.t0
    extra = unlinked_images(out, before, lines)
    if extra:  # a section that forgot a link still shows every image it wrote
        log.warning("section %s did not link %s; linked at its end", section.name, ", ".join(extra))
        lines = lines + ["Also written: " + " ".join(f"![{n}]({n})" for n in extra), ""]
    return lines, secs, progress.calls


def build_parser():
    p = cli.parser(__doc__, "attention.demo")
    p.add_argument("--out", type=cli.output_dir, default="demo_output",
                   help="folder for report.md and the PNGs (created after the weights are checked)")
    cli.add_weights(p)
    p.add_argument("--quick", action="store_true", help="fewer prompts, seeds and scenes for the figures")
    p.add_argument("--sections", nargs="+", choices=[s.name for s in SECTIONS], metavar="NAME",
                   default=[s.name for s in SECTIONS],
                   help="run only these sections, in the demo's order (default: all): "
                   + ", ".join(s.name for s in SECTIONS))
    cli.add_threads(p)
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # `kill` or a timeout ends the demo as Ctrl-C does: the report says what finished


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cli.set_threads(args.threads)
    t0 = time.perf_counter()
    model = cli.load_model(p, args.weights)  # before the output folder exists: a bad file leaves nothing behind
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    planned = [s for s in SECTIONS if s.name in args.sections]
    import torch
    weights = Path(args.weights) if args.weights else cli.SHIPPED_WEIGHTS
    head = ["# Attention Lab demo (ShapesWorld)", "",
            f"Model: `{weights.name}`, training {json.dumps(model.training)}. Mode: "
            f"{'--quick' if args.quick else 'full'}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"started {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    report = Report(out, head, planned)
    counts_file, mode = out / COUNTS, "quick" if args.quick else "full"
    try:
        counts = json.loads(counts_file.read_text())
    except (OSError, ValueError):
        counts = {}
    report.write(f"Running: 0 of {len(planned)} sections done; this file is rewritten after each section.")
    log.info("demo: %d sections into %s (%s)", len(planned), out, "--quick" if args.quick else "full")
    current = None
    main_thread = threading.current_thread() is threading.main_thread()  # signals can be set there only
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        for i, section in enumerate(planned, 1):
            current = section
            report.state[section.name] = "running"
            report.write(f"Running section {i} of {len(planned)} after {time.perf_counter() - t0:.0f} s; this file is "
                         f"rewritten after each section.")
            try:
                lines, secs, calls = run_section(section, i, len(planned), model, out, args.quick,
                                                 counts.get(mode, {}))
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - one broken section must not hide the others' results
                log.exception("[%d/%d] %s failed", i, len(planned), section.title)
                report.state[section.name] = f"failed: {type(e).__name__}: {e}"
            else:
                report.state.pop(section.name)
                report.done[section.name] = (lines, secs, calls)
                counts.setdefault(mode, {})[section.name] = calls
                counts_file.write_text(json.dumps(counts, indent=1))
                log.info("[%d/%d] %s: %.1f s, %s UNet calls", i, len(planned), section.title, secs, f"{calls:,}")
            report.write(f"Running: {i} of {len(planned)} sections done after {time.perf_counter() - t0:.0f} s; "
                         f"this file is rewritten after each section.")
    except KeyboardInterrupt:
        total = time.perf_counter() - t0
        report.state[current.name] = "interrupted"
        report.write(f"Interrupted (Ctrl-C or a stop signal) during \"{current.title}\" after {total:.1f} s: "
                     f"{len(report.done)} of {len(planned)} sections finished and are shown below.")
        log.info("\ninterrupted after %.1f s; the report of the %d finished sections: %s", total, len(report.done),
                 report.path)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    total = time.perf_counter() - t0
    failed = len(report.state)
    report.write(f"Finished: {len(report.done)} of {len(planned)} sections in {total:.1f} s"
                 + (f"; {failed} failed (see the table and the console)." if failed else "."))
    log.info("demo finished in %.1f s (%d sections%s); report: %s", total, len(planned),
             f", {failed} failed" if failed else "", report.path)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
