"""The demo's machinery: a section's progress bar, its log, and the report rewritten after every section."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger("attention_lab.demo")
PACK_LOGGER = "attention_lab"   # attention.logger and every figure command's logger are below it


@dataclass(frozen=True)
class Section:
    name: str                          # --sections key and anchor in the report
    title: str                         # shown in the progress lines and the report's contents
    function: Callable                 # (model, out_folder, save, quick) -> markdown lines
    calls: tuple[int, int] | None = None   # UNet evaluations of a measured run (--quick, full): the bar's 100 %


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


class SectionLog(logging.Handler):
    """Keeps what the pack's loggers (``attention_lab.*``) say while a section runs, for the report: the terminal
    shows the progress and result lines only, and warnings and errors as they come."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        if record.levelno >= logging.WARNING:
            logging.getLogger().handle(record)

    def report_lines(self) -> list[str]:
        if not self.lines:
            return []
        return [f"<details><summary>Section log ({len(self.lines)} lines)</summary>", "", "```text", *self.lines,
                "```", "", "</details>", ""]


@contextmanager
def section_log():
    """Routes the ``attention_lab`` loggers into a ``SectionLog`` (instead of the terminal) for a ``with`` block."""
    pack, handler = logging.getLogger(PACK_LOGGER), SectionLog()
    propagate = pack.propagate
    pack.addHandler(handler)
    pack.propagate = False
    try:
        yield handler
    finally:
        pack.propagate = propagate
        pack.removeHandler(handler)


def run_section(section: Section, index: int, total: int, model, out: Path, quick: bool, known: dict):
    """(markdown lines, seconds, UNet calls) of one section, with its progress bar (``known``: calls counted
    by an earlier run into the same folder; else the section's measured ``calls``; else a bare count)."""
    expected = known.get(section.name) or (section.calls[0 if quick else 1] if section.calls else None)
    progress = Progress(f"[{index}/{total}] {section.title}", expected)
    before = {p.name: p.stat().st_mtime for p in out.glob("*.png")}
    handle = model.unet.register_forward_hook(progress.hook)
    try:
        with section_log() as said:
            lines = section.function(model, out, save, quick)
    finally:
        handle.remove()
        progress.close()
    secs = time.perf_counter() - progress.t0
    extra = unlinked_images(out, before, lines)
    if extra:  # a section that forgot a link still shows every image it wrote
        log.warning("section %s did not link %s; linked at its end", section.name, ", ".join(extra))
        lines = lines + ["Also written: " + " ".join(f"![{n}]({n})" for n in extra), ""]
    return lines + said.report_lines(), secs, progress.calls
