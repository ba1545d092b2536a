"""The Attention Lab demo: every pipeline of the pack on ShapesWorld, on a CPU.

    .venv/bin/python -m attention.demo --out demo_output [--quick] [--sections capture spatext]

Runs the sections below in order, each through the same code as the ComfyUI nodes, and writes PNGs and
``report.md`` into the output folder. The report is rewritten after every section, so a run stopped
with Ctrl-C (or killed) leaves a readable report of the sections that finished. Progress goes to the
terminal: one line per section with its time, and while a section runs a line counting its UNet
evaluations, a bar when the count is known (``progress.json`` in the output folder keeps each finished
section's count, so a second run into the same folder shows bars for all of them). What a section's
figure commands log goes into its part of the report, not to the terminal.

Adding a section: write ``attention/demo/<name>.py`` with a function
``(model, out_folder, save, quick) -> list of markdown lines`` (its own ``## heading``; every PNG it
saves linked from its lines), import it below and add one ``Section(...)`` line to ``SECTIONS``.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import torch

from .. import cli
from ..shapesworld.weights import SHIPPED_WEIGHTS
from .capture import capture_section, samples_section
from .dpl import dpl_section
from .editing import mnm_section, p2p_section
from .grounding import grounding_section
from .quality import quality_section
from .runner import Report, Section, run_section
from .spatext import spatext_section
from .structure import structure_section

log = logging.getLogger("attention_lab.demo")

SECTIONS = (
    Section("samples", "Text to image", samples_section, (20, 20)),
    Section("capture", "Attention capture and clustering", capture_section, (20, 20)),
    Section("mnm", "Prompt mixing (MnM)", mnm_section),
    Section("p2p", "Null-Text Inversion and Prompt-to-Prompt", p2p_section),
    Section("dpl", "Dynamic Prompt Learning", dpl_section),
    Section("structure", "StructureDiffusion", structure_section),
    Section("spatext", "SpaText (training-free)", spatext_section),
    Section("grounding", "Grounded generation", grounding_section),
    Section("quality", "Quality harness", quality_section),
)
COUNTS = "progress.json"   # in the output folder: each finished section's UNet calls, the bars' 100 % next time


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
    weights = Path(args.weights) if args.weights else SHIPPED_WEIGHTS
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
