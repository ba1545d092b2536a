"""Editor check: the pack in ComfyUI's real graph editor, driven in headless Chromium.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy/python tools/editor_check.py [--server URL] [--chromium PATH]

Needs this checkout installed in ``$COMFYUI_PATH/custom_nodes`` (a clone or a symlink), a Chromium or Chrome
binary, and ComfyUI's Python (its aiohttp speaks to Chromium's DevTools protocol; nothing else is installed).
Without ``--server`` it starts ``$COMFYUI_PATH/main.py --cpu`` on ``--port`` with a throw-away user and temp
directory, and stops it at the end. It checks, through the frontend's own code paths (comfyui-frontend-package
1.35):

* **help panel**, for every node whose ``python_module`` is ``custom_nodes.<this pack>`` in ``/object_info``:
  the node library sidebar is opened and the frontend's ``nodeHelp`` store is asked to open the node's help
  (what the library's help button does). NodeHelpService fetches ``/extensions/<pack>/docs/<NodeId>/<locale>.md``,
  then ``/extensions/<pack>/docs/<NodeId>.md``; the check records those requests, that the page served is this
  checkout's ``web/docs/<NodeId>.md`` byte for byte, that the panel (``.node-help-content``) shows its title,
  and that every picture in the panel loaded.
* **templates**: ``/api/workflow_templates`` lists exactly the top-level ``workflows/*.json``; each one is opened
  from the template browser (Workflow -> Browse Templates -> <pack> -> its card), whose card shows the thumbnail
  ``/api/workflow_templates/<pack>/<name>.jpg``. After loading: no missing node type, no dialog (the missing-node
  dialog), no console error or exception; every node's widget values as the editor serializes them equal the
  saved ``widgets_values``; the editor's widget names equal those derived from ``/object_info`` (the rule of
  tests/test_nodes_widgets.py); numbers within the widget's range and combo values among its options (a
  model or image file this installation lacks is listed apart: the user supplies it); and the editor's
  API export (graphToPrompt) equals ``workflows/api/<name>_api.json``.

The browser and the page scripts are tools/editor_browser.py, the comparisons of a template
tools/editor_templates.py. Prints two tables and a summary; exits 0 when everything passed, 1 otherwise, 2 on a
set-up error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from editor_browser import JS_HELP, JS_HELPERS, JS_OPEN_LIBRARY, JS_TEMPLATE, DevTools  # noqa: E402
from editor_templates import WORKFLOWS, check_template  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "web" / "docs"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(comfy: Path, python: str, port: int, work: Path) -> subprocess.Popen:
    (work / "user").mkdir()
    log = open(work / "server.log", "w")
    proc = subprocess.Popen([python, str(comfy / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--disable-auto-launch", "--user-directory", str(work / "user"),
                             "--temp-directory", str(work)], cwd=comfy, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {proc.returncode}; see {work / 'server.log'}")
        try:
            get(f"http://127.0.0.1:{port}/api/system_stats")
            return proc
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"ComfyUI did not answer on port {port} within 300 s; see {work / 'server.log'}")


def table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


async def run_checks(server: str, chromium: str, verbose: bool) -> tuple[list, list, list[str]]:
    object_info = json.loads(get(f"{server}/object_info"))
    if "AttentionCapture" not in object_info:
        raise RuntimeError(f"{server} has no Attention Lab nodes: install this checkout in custom_nodes")
    module = object_info["AttentionCapture"]["python_module"]           # custom_nodes.<folder>
    pack = module.split(".")[1]
    ours = sorted(k for k, v in object_info.items() if v.get("python_module") == module)
    pages = sorted(p.stem for p in DOCS.glob("*.md"))
    notes = [f"server {server}: {len(object_info)} node types, {len(ours)} from {module}; "
             f"{len(pages)} pages in web/docs"]
    if set(pages) != set(ours):
        notes.append(f"FAIL pages without a node: {sorted(set(pages) - set(ours))}; "
                     f"nodes without a page: {sorted(set(ours) - set(pages))}")
    listed_api = json.loads(get(f"{server}/api/workflow_templates")).get(pack, [])
    local = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    notes.append(f"/api/workflow_templates lists {len(listed_api)} templates for {pack}; "
                 f"workflows/ has {len(local)} top-level .json")
    if sorted(listed_api) != local:
        notes.append(f"FAIL listed != workflows/*.json: {sorted(set(listed_api) ^ set(local))}")

    browser = DevTools(chromium)
    await browser.start()
    help_rows, template_rows = [], []
    try:
        page = await browser.open(f"{server}/")
        t0 = time.time()
        while time.time() - t0 < 180:
            try:
                if await browser.js(page, "!!(window.app && app.graph && app.extensionManager && "
                                          "document.querySelector('#vue-app'))"):
                    break
            except RuntimeError:
                pass
            await asyncio.sleep(1)
        else:
            raise RuntimeError("the editor did not start within 180 s")
        await browser.js(page, JS_HELPERS)
        version = await browser.js(page, "window.__COMFYUI_FRONTEND_VERSION__")
        notes.append(f"frontend {version}, editor ready in {time.time() - t0:.0f} s")
        await browser.js(page, JS_OPEN_LIBRARY)
        await asyncio.sleep(1)

        for node in ours:
            local_page = (DOCS / f"{node}.md").read_bytes() if (DOCS / f"{node}.md").is_file() else b""
            title = local_page.decode().splitlines()[0].lstrip("# ").strip() if local_page else ""
            mark = browser.mark()
            r = await browser.js(page, f"({JS_HELP})({json.dumps(node)}, {json.dumps(title)})")
            await asyncio.sleep(0.3)
            requests = browser.responses(mark, "/docs/")
            md = [(u, s) for u, s in requests if u.endswith(".md")]
            served_url = next((u for u, s in md if s == 200), None)
            served = get(served_url) if served_url else b""
            images = r.get("images", [])
            row = {"node": node, "requests": md, "served_url": served_url, "same_file": served == local_page != b"",
                   "panel": r.get("panel", False) and r.get("h1") == title, "images": images,
                   "error": r.get("problem") or r.get("error"),
                   "problems": browser.problems(mark, re.compile(re.escape(f"/docs/{node}/") + r"[a-z-]+\.md"))}
            row["ok"] = (row["same_file"] and row["panel"] and not row["error"] and not row["problems"]
                         and all(i["width"] > 0 for i in images))
            help_rows.append(row)
            if verbose:
                print(json.dumps(row), flush=True)

        for name in local:
            saved = json.loads((WORKFLOWS / f"{name}.json").read_text())
            mark = browser.mark()
            try:
                r = await browser.js(page, f"({JS_TEMPLATE})({json.dumps(pack)}, {json.dumps(name)}, "
                                           f"{len(saved['nodes'])})")
            except RuntimeError as e:
                r = {"problem": str(e)}
            await asyncio.sleep(0.3)
            opened = browser.responses(mark, f"/workflow_templates/{pack}/{name}.json")
            row = {"template": name, "listed_api": name in listed_api, "problems": browser.problems(mark),
                   "json_request": opened}
            if "problem" in r:
                row.update(error=r["problem"], ok=False)
            else:
                row.update(check_template(name, r, object_info))
                row.update(listed_browser=name in r["listed"], thumb=r["thumb"], nodes=len(r["nodes"]),
                           links=r["links"], dialogs=r["dialogs"], workflow=r["workflow"])
                row["ok"] = (row["listed_api"] and row["listed_browser"] and bool(r["thumb"])
                             and 200 in dict(opened).values() and row["nodes"] == row["saved_nodes"]
                             and row["links"] == row["saved_links"]
                             and not any(row[k] for k in ("missing", "mismatches", "schema", "outside", "twin_diff",
                                                          "dialogs", "problems")))
            template_rows.append(row)
        # the cards fetch their thumbnails lazily (and once): every one requested, served, equal to the file
        thumbs = dict(browser.responses(0, f"/workflow_templates/{pack}/"))
        for row in template_rows:
            url = f"{server}/api/workflow_templates/{pack}/{row['template']}.jpg"
            local = WORKFLOWS / f"{row['template']}.jpg"
            row["thumb_request"] = thumbs.get(url)
            row["thumb_same_file"] = local.is_file() and row["thumb_request"] == 200 and get(url) == local.read_bytes()
            row["ok"] = row["ok"] and row["thumb_same_file"]
            if verbose:
                print(json.dumps(row), flush=True)
    finally:
        await browser.close()
    return help_rows, template_rows, notes


def report(help_rows: list, template_rows: list, notes: list[str]) -> bool:
    print("\nHelp panel (node library -> help), one row per node of the pack")
    print(table(["node", "frontend requests (status)", "served = web/docs file", "panel shows page",
                 "pictures loaded", "errors", "ok"],
                [[r["node"], ", ".join(f"{u.split('/docs/')[-1]} ({s})" for u, s in r["requests"]),
                  "yes" if r["same_file"] else "NO", "yes" if r["panel"] else "NO",
                  f"{sum(i['width'] > 0 for i in r['images'])}/{len(r['images'])}",
                  len(r["problems"]) + bool(r["error"]), "ok" if r["ok"] else "FAIL"] for r in help_rows]))
    print("\nTemplates (template browser -> attention_lab -> card), one row per workflows/*.json")
    rows = []
    for r in template_rows:
        if "error" in r:
            rows.append([r["template"], "", "", "", "", "", "", "", "", "", r["error"][:60], "FAIL"])
            continue
        rows.append([r["template"], "yes" if r["listed_api"] and r["listed_browser"] else "NO",
                     ("x".join(map(str, r["thumb"])) if r["thumb"] else "NONE")
                     + (f" {r['template']}.jpg ({r['thumb_request']}{', = file' if r['thumb_same_file'] else ''})"),
                     f"{r['nodes']}/{r['saved_nodes']}", f"{r['links']}/{r['saved_links']}", len(r["missing"]),
                     len(r["mismatches"]) + len(r["schema"]), len(r["outside"]), len(r["files"]),
                     ("equal" if not r["twin_diff"] else f"{len(r['twin_diff'])} differ")
                     + (f" (+{len(r['editor_only'])} editor-only)" if r["editor_only"] else ""),
                     len(r["problems"]) + len(r["dialogs"]), "ok" if r["ok"] else "FAIL"])
    print(table(["template", "listed", "card thumbnail (request)", "nodes", "links", "missing types",
                 "widget mismatches", "out of range/options", "files to supply", "API export vs twin",
                 "errors/dialogs", "ok"], rows))
    for r in help_rows + template_rows:
        keys = ("error", "problems", "missing", "mismatches", "schema", "outside", "twin_diff", "dialogs")
        details = [f"  {k}: {v}" for k in keys for v in ([r.get(k)] if k == "error" else r.get(k, [])) if v]
        if details:
            print(f"\n{r.get('node') or r.get('template')}:\n" + "\n".join(details))
    extra = sorted({e.split("#")[0] + "." + e.split(".")[-1] for r in template_rows for e in r.get("editor_only", [])})
    if extra:
        print("\ninputs the editor's API export adds for its own widgets, not declared by the node (the server ignores "
              "them; the API twins leave them out):\n  " + ", ".join(extra))
    files = sorted({f for r in template_rows for f in r.get("files", [])})
    if files:
        print("\nfiles the SD templates name that this installation lacks (the user supplies them; not a mismatch):\n  "
              + "\n  ".join(files))
    good = all(r["ok"] for r in help_rows + template_rows) and not any(n.startswith("FAIL") for n in notes)
    print("\n" + "\n".join(notes))
    print(f"\nhelp pages: {sum(r['ok'] for r in help_rows)}/{len(help_rows)} ok; templates: "
          f"{sum(r['ok'] for r in template_rows)}/{len(template_rows)} ok; widget mismatches: "
          f"{sum(len(r.get('mismatches', [])) + len(r.get('schema', [])) for r in template_rows)}; "
          f"missing node types: {sum(len(r.get('missing', [])) for r in template_rows)}")
    return good


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", help="a running ComfyUI with this pack (default: start $COMFYUI_PATH/main.py --cpu)")
    p.add_argument("--port", type=int, help="port of the server started here (default: a free one)")
    p.add_argument("--chromium", help=f"browser binary (default: the first of {', '.join(BROWSERS)} on PATH)")
    p.add_argument("--json", type=Path, help="also write every result to this file")
    p.add_argument("--verbose", action="store_true", help="print each result as it comes")
    args = p.parse_args(argv)
    chromium = args.chromium or next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if not chromium or not shutil.which(chromium):
        p.error("no Chromium/Chrome found: install one (e.g. apt-get install chromium) or pass --chromium PATH")
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        p.error("run this with ComfyUI's Python (it has aiohttp)")
    server, proc, work = args.server, None, None
    if not server:
        comfy = Path(os.environ.get("COMFYUI_PATH", ""))
        if not (comfy / "main.py").is_file():
            p.error("set COMFYUI_PATH to a ComfyUI checkout with this pack in custom_nodes, or pass --server URL")
        work = Path(tempfile.mkdtemp(prefix="editor_check_"))
        port = args.port or free_port()
        print(f"starting ComfyUI on port {port} (log: {work / 'server.log'})", flush=True)
        try:
            proc = start_server(comfy, sys.executable, port, work)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            return 2
        server = f"http://127.0.0.1:{port}"
    server = server.rstrip("/")
    try:
        help_rows, template_rows, notes = asyncio.run(run_checks(server, chromium, args.verbose))
    except (RuntimeError, urllib.error.URLError, OSError) as e:
        print(f"editor check could not run: {e}", file=sys.stderr)
        return 2
    finally:
        if proc:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"help": help_rows, "templates": template_rows, "notes": notes}, indent=1))
    good = report(help_rows, template_rows, notes)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
