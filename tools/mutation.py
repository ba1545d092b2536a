"""Mutation testing of the ported modules with mutmut (pinned in requirements-test.txt): does every ported function
have a test that fails when its code is changed? Not part of the README's test command (CI): it takes hours.

For each module the run happens in a copy of the repository's tracked files under --workdir (the checkout is never
touched), with a setup.cfg that tells mutmut to mutate that module only and to select the tier-1 test files that
cover it (``COVERING`` below; mutmut then runs, per mutant, only the tests that reached the mutated function).
One module at a time, one worker (``--max-children 1``) and OMP_NUM_THREADS=1 by default: on a shared 2-core
machine run it in the background with a log, e.g.

    OMP_NUM_THREADS=1 nohup python tools/mutation.py --module dpl_losses > /tmp/mutation.log 2>&1 &

It prints, per module, mutmut's result counts (killed, survived, timeout, no tests, ...) and writes the surviving
mutants' names (with --show their diffs) to <workdir>/<module>/survivors.txt. Which survivors are equivalent is
judged by a person and recorded in docs/faithful-ports.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> the tier-1 test files that exercise it (fast ones; the slow figure-like tests stay out)
COVERING: dict[str, list[str]] = {
    "p2p": ["tests/test_faithful_attention.py", "tests/test_words.py", "tests/test_faithful_p2p.py",
            "tests/test_faithful_p2p_rows.py"],
    "inversion": ["tests/test_faithful_ports.py"],
    "dpl": ["tests/test_faithful_ports.py", "tests/test_faithful_dpl.py"],
    "dpl_losses": ["tests/test_faithful_ports.py", "tests/test_dpl_losses.py"],
    "prompt_mixing": ["tests/test_faithful_attention.py", "tests/test_faithful_proxies.py",
                      "tests/test_faithful_prompt_mixing.py", "tests/test_prompt_mixing_dit.py"],
    "structure": ["tests/test_structure.py"],
    "store": ["tests/test_faithful_attention.py", "tests/test_faithful_store.py", "tests/test_attention_core.py",
              "tests/test_concept_attention.py"],
    "cluster": ["tests/test_cluster.py", "tests/test_faithful_attention.py"],
    "grounding": ["tests/test_grounding.py", "tests/test_ported_edges.py"],
    "direct_inversion": ["tests/test_direct_inversion.py", "tests/test_ported_edges.py"],
    "rf_inversion": ["tests/test_rf_inversion.py", "tests/test_ported_edges.py"],
    "concept_attention": ["tests/test_concept_attention.py", "tests/test_ported_edges.py"],
}
# slow tests left out of a module's run (they train a head for seconds each; the equality tests stay)
DESELECT: dict[str, list[str]] = {
    "grounding": ["tests/test_grounding.py::test_committed_head_quality_gates",
                  "tests/test_grounding.py::test_overfits_one_scene"],
}
STATUSES = ("killed", "survived", "timeout", "suspicious", "no tests", "skipped", "not checked", "segfault",
            "check was interrupted by user", "caught by type check")


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return [f for f in out.splitlines() if f and not f.startswith(("workflows/", "web/", "docs/"))]


def prepare(module: str, workdir: Path) -> Path:
    """A fresh copy of the repository with a setup.cfg for ``module``; returns its folder."""
    dest = workdir / module
    if dest.exists():
        shutil.rmtree(dest)
    for rel in tracked_files():
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    tests = [t for t in COVERING[module] if (dest / t).is_file()]
    lines = ["[mutmut]", "source_paths=attention/", f"only_mutate=attention/{module}.py", "also_copy=",
             "    assets/", "    __init__.py", "pytest_add_cli_args_test_selection="]
    lines += [f"    {t}" for t in tests]
    lines += ["pytest_add_cli_args=", "    -p", "    no:randomly", "    -q"]
    for test in DESELECT.get(module, []):
        lines += ["    --deselect", f"    {test}"]
    lines += ["use_git_change_detection=false", ""]
    (dest / "setup.cfg").write_text("\n".join(lines))
    return dest


def results(dest: Path, mutmut: str, env: dict, show: bool = False, only: list[str] | None = None) -> Counter:
    out = subprocess.run([mutmut, "results", "--all", "true"], cwd=dest, env=env, capture_output=True, text=True)
    counts: Counter = Counter()
    survivors = []
    for line in out.stdout.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if only and not any(fnmatch.fnmatch(name, pat) for pat in only):
            continue
        if status in STATUSES:
            counts[status] += 1
            if status == "survived":
                survivors.append(name)
    with open(dest / "survivors.txt", "w") as f:
        for name in survivors:
            diff = subprocess.run([mutmut, "show", name], cwd=dest, env=env, capture_output=True,
                                  text=True).stdout if show else ""
            f.write(f"==== {name}\n{diff}\n")
    return counts


def mutant_glob(module: str, function: str) -> str:
    """mutmut's name pattern for the mutants of one function: ``attention.m.x_f__mutmut_*`` for a function,
    ``attention.m.xǁCǁm__mutmut_*`` for a method ``C.m`` (mutmut 3's naming)."""
    cls, _, name = function.rpartition(".")
    stem = f"x\u01c1{cls}\u01c1{name}" if cls else f"x_{name}"
    return f"attention.{module}.{stem}__mutmut_*"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--module", action="append", choices=sorted(COVERING),
                   help="module of attention/ to mutate (repeatable; default: all, one after the other)")
    p.add_argument("--workdir", default="/tmp/attention_lab_mutation", help="where the copies and results go")
    p.add_argument("--max-children", type=int, default=1, help="mutmut workers (default 1)")
    beside = Path(sys.executable).parent / "mutmut"
    p.add_argument("--mutmut", default=str(beside) if beside.exists() else shutil.which("mutmut"),
                   help="the mutmut executable (default: the one next to this python; requirements-test.txt pins it)")
    p.add_argument("--only", action="append", metavar="FUNCTION",
                   help="mutate only these functions of the module (repeatable; 'Class.method' or a glob such as "
                        "'pixel_embedding'); the counts then cover those functions only")
    p.add_argument("--list", action="store_true", help="print the modules and their test files, run nothing")
    p.add_argument("--show", action="store_true",
                   help="also write each survivor's diff (one 'mutmut show' per survivor; else see 'mutmut show NAME')")
    args = p.parse_args(argv)
    modules = args.module or sorted(COVERING)
    if args.list:
        for m in modules:
            skip = "".join(f" (without {t})" for t in DESELECT.get(m, []))
            print(f"attention/{m}.py: {' '.join(COVERING[m])}{skip}")
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    summary = {}
    for module in modules:
        t0 = time.time()
        dest = prepare(module, Path(args.workdir))
        print(f"== attention/{module}.py in {dest} (tests: {', '.join(COVERING[module])})", flush=True)
        only = [mutant_glob(module, f) for f in args.only or []]
        run = subprocess.run([args.mutmut, "run", "--max-children", str(args.max_children), *only], cwd=dest,
                             env=env)
        counts = results(dest, args.mutmut, env, args.show, only)
        summary[module] = dict(counts, mutants=sum(counts.values()), seconds=round(time.time() - t0),
                               mutmut_exit=run.returncode)
        print(json.dumps({module: summary[module]}), flush=True)
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
