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

Prints two tables and a summary; exits 0 when everything passed, 1 otherwise, 2 on a set-up error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
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

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "web" / "docs"
WORKFLOWS = ROOT / "workflows"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# requests and messages of an idle editor on an offline machine, unrelated to the pack
IGNORED = re.compile(r"/user\.css|/favicon\.ico|/api/userdata|api\.comfy\.org|ERR_NAME_NOT_RESOLVED|"
                     r"ERR_INTERNET_DISCONNECTED|ERR_CONNECTION_REFUSED.*comfy\.org")
FILE_WIDGETS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoadImage", "image"), ("LoadImageMask", "image")}

JS_HELPERS = r"""
window.__alc = {
  sleep: ms => new Promise(r => setTimeout(r, ms)),
  async until(f, ms = 30000) {
    const t = Date.now(); let v;
    while (!(v = f()) && Date.now() - t < ms) await __alc.sleep(100);
    return v;
  },
  store(name) { return document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia._s.get(name); },
};
true
"""

JS_OPEN_LIBRARY = r"""
(async () => {
  const tabs = __alc.store('sidebarTab');
  if (tabs.activeSidebarTabId !== 'node-library')
    await app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library');
  return tabs.activeSidebarTabId;
})()
"""

JS_HELP = r"""
(async (name, title) => {
  const help = __alc.store('nodeHelp'), def = __alc.store('nodeDef').nodeDefsByName[name];
  if (!def) return {problem: 'not in the editor\'s node definitions'};
  help.closeHelp();
  await __alc.sleep(50);
  help.openHelp(def);
  await __alc.until(() => !help.isLoading && (help.renderedHelpHtml || help.error));
  const panel = await __alc.until(() => {
    const e = document.querySelector('.node-help-content');
    return e && e.querySelector('h1') && e.querySelector('h1').textContent.trim() === title ? e : null;
  }, 15000);
  const imgs = panel ? [...panel.querySelectorAll('img')] : [];
  await __alc.until(() => imgs.every(i => i.complete), 15000);
  return {python_module: def.python_module, base_url: help.baseUrl, error: help.error, panel: !!panel,
          h1: panel ? panel.querySelector('h1').textContent.trim() : null,
          images: imgs.map(i => ({src: i.getAttribute('src'), url: i.src, width: i.naturalWidth}))};
})
"""

JS_TEMPLATE = r"""
(async (pack, name, count) => {
  const dialogs = __alc.store('dialog');
  app.graph.clear();
  await app.extensionManager.command.execute('Comfy.BrowseTemplates');
  const dlg = await __alc.until(() => [...document.querySelectorAll('[role=dialog]')]
      .find(d => d.querySelector('[data-testid=template-workflows-content]')));
  if (!dlg) return {problem: 'the template browser did not open'};
  const nav = await __alc.until(() => [...dlg.querySelectorAll('span')].find(e => e.textContent.trim() === pack));
  if (!nav) return {problem: `no "${pack}" entry in the template browser's Extensions`};
  nav.click();
  const card = await __alc.until(() => dlg.querySelector(`[data-testid="template-workflow-${name}"]`));
  if (!card) return {problem: 'no card in the template browser'};
  const listed = [...dlg.querySelectorAll('[data-testid^="template-workflow-"]')]
      .map(e => e.getAttribute('data-testid').slice('template-workflow-'.length))
      .filter(n => n !== 'workflows-content');
  card.scrollIntoView();
  const img = await __alc.until(() => {
    const i = card.querySelector('img');
    return i && i.complete && i.naturalWidth ? i : null;
  }, 15000);
  const thumb = img ? [img.naturalWidth, img.naturalHeight] : null;
  card.click();
  await __alc.until(() => app.graph.nodes.length === count && !document.contains(dlg), 30000);
  await __alc.sleep(1500);                      // a missing-node dialog or a late error would show by now
  const graph = app.graph.serialize();
  const live = Object.fromEntries(app.graph.nodes.map(n => [n.id, n]));
  const nodes = graph.nodes.map(n => {
    const node = live[n.id];
    // the widgets whose values a file holds, in order: on load the editor hands widgets_values out to these
    // (display widgets with serialize === false, e.g. PreviewAny's two 'preview' ones, take none)
    const widgets = (node.widgets || []).filter(w => w.serialize !== false)
      .map(w => ({name: w.name, type: w.type, value: w.value,
                  values: Array.isArray(w.options?.values) ? w.options.values : null,
                  min: w.options?.min ?? null, max: w.options?.max ?? null}));
    return {id: n.id, type: n.type, widgets,
            registered: !!LiteGraph.registered_node_types[n.type], has_errors: !!node.has_errors};
  });
  let prompt = null, prompt_error = null;
  try { prompt = (await app.graphToPrompt()).output; } catch (e) { prompt_error = String(e); }
  return {listed, thumb, nodes, links: graph.links.length, prompt, prompt_error,
          dialogs: dialogs.dialogStack.map(d => d.key + ': '
                                           + (document.querySelector('[role=dialog]')?.innerText || '').slice(0, 200)),
          workflow: __alc.store('workflow').activeWorkflow?.filename ?? null};
})
"""


class DevTools:
    """The few calls of Chrome's DevTools protocol this check needs, over aiohttp's websocket client."""

    def __init__(self, chromium: str):
        self.chromium = chromium
        self.events: list[dict] = []

    async def start(self):
        import aiohttp
        self.profile = tempfile.mkdtemp(prefix="editor_check_chromium_")
        self.proc = subprocess.Popen(
            [self.chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             "--window-size=1600,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            line = await asyncio.to_thread(self.proc.stderr.readline)
            if not line:
                break
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                self.http = aiohttp.ClientSession()
                self.ws = await self.http.ws_connect(m.group(1), max_msg_size=0)
                self.pending: dict[int, asyncio.Future] = {}
                self.next_id = 0
                self.reader = asyncio.create_task(self._read())
                return
        raise RuntimeError(f"{self.chromium} did not open its DevTools port")

    async def _read(self):
        async for msg in self.ws:
            d = json.loads(msg.data)
            if d.get("id") in self.pending:
                self.pending.pop(d["id"]).set_result(d)
            else:
                self.events.append(d)

    async def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.ws.send_str(json.dumps(msg))
        d = await asyncio.wait_for(fut, 180)
        if "error" in d:
            raise RuntimeError(f"{method}: {d['error']}")
        return d["result"]

    async def open(self, url: str) -> str:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        session = attached["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            await self.send(f"{domain}.enable", session=session)
        await self.send("Page.navigate", {"url": url}, session=session)
        return session

    async def js(self, session: str, expression: str):
        r = await self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                  "returnByValue": True}, session=session)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise RuntimeError(d.get("exception", {}).get("description") or d.get("text"))
        return r["result"].get("value")

    async def close(self):
        try:
            await self.send("Browser.close")
        except Exception:
            pass
        if hasattr(self, "http"):
            await self.http.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def mark(self) -> int:
        return len(self.events)

    def problems(self, since: int, allow: re.Pattern | None = None) -> list[str]:
        """Console errors, exceptions and failed requests since ``since`` (those of an idle editor left out)."""
        out = []
        for e in self.events[since:]:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
            elif m == "Runtime.consoleAPICalled" and p["type"] == "error":
                out.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                        for a in p["args"]))
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"{p['entry']['text']} {p['entry'].get('url', '')}".strip())
        return [o[:300] for o in out if not IGNORED.search(o) and not (allow and allow.search(o))]

    def responses(self, since: int, pattern: str) -> list[tuple[str, int]]:
        return [(e["params"]["response"]["url"], e["params"]["response"]["status"]) for e in self.events[since:]
                if e.get("method") == "Network.responseReceived" and pattern in e["params"]["response"]["url"]]


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


def expected_widgets(info: dict) -> list[str]:
    """Widget names the editor makes for a node, from its /object_info entry (tests/test_nodes_widgets.py)."""
    names = []
    for section in ("required", "optional"):
        upload = None
        for name in info.get("input_order", {}).get(section, []):
            spec = info["input"][section][name]
            kind, opts = spec[0], dict(spec[1]) if len(spec) > 1 and spec[1] else {}
            if kind == "COMBO" or isinstance(kind, list):
                kind = "COMBO"
            if kind not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") or opts.get("forceInput"):
                continue
            names.append(name)
            control = opts.get("control_after_generate")
            if control is None:
                control = kind == "INT" and name in ("seed", "noise_seed")
            if control:
                names.append("control_after_generate")
            if section == "required" and opts.get("image_upload") and upload is None:
                upload = "upload"
        if upload:      # the Comfy.UploadImage extension appends its input to the end of the required ones
            names.append(upload)
    if info["name"] == "PreviewAny":
        names.append("previewMode")
    return names


def same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9,
                                                                                           abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def check_template(name: str, r: dict, object_info: dict) -> dict:
    saved = json.loads((WORKFLOWS / f"{name}.json").read_text())
    by_id = {n["id"]: n for n in r["nodes"]}
    mismatches, schema, outside, files = [], [], [], []
    missing = sorted({n["type"] for n in r["nodes"] if not n["registered"]}
                     | {n["type"] for n in saved["nodes"] if n["id"] not in by_id})
    for n in saved["nodes"]:
        live = by_id.get(n["id"])
        if live is None:
            continue
        want, got = n.get("widgets_values", []), [w["value"] for w in live["widgets"]]
        if not same(want, got):
            mismatches.append(f"{n['type']}#{n['id']}: saved {want} -> editor's widgets {got}")
        names = [w["name"] for w in live["widgets"]]
        if n["type"] in object_info:
            expect = expected_widgets(object_info[n["type"]])
            if names != expect:
                schema.append(f"{n['type']}#{n['id']}: editor {names} vs /object_info {expect}")
        for w in live["widgets"]:
            where = f"{n['type']}.{w['name']} = {w['value']!r}"
            if w["values"] is not None and w["value"] not in w["values"]:
                (files if (n["type"], w["name"]) in FILE_WIDGETS else outside).append(where)
            if isinstance(w["value"], (int, float)) and not isinstance(w["value"], bool):
                if (w["min"] is not None and w["value"] < w["min"]) or (w["max"] is not None and w["value"] > w["max"]):
                    outside.append(f"{where} outside [{w['min']}, {w['max']}]")
    api = json.loads((WORKFLOWS / "api" / f"{name}_api.json").read_text())
    twin = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    exported, extra = {}, []
    for k, v in (r["prompt"] or {}).items():
        # inputs the editor exports for its own widgets that the node does not declare (PreviewAny's preview and
        # previewMode): the server ignores them, the twin leaves them out
        declared = {i for sec in object_info.get(v["class_type"], {}).get("input", {}).values() for i in sec}
        extra += [f"{v['class_type']}#{k}.{i}" for i in v["inputs"] if i not in declared]
        exported[k] = {"class_type": v["class_type"], "inputs": {i: x for i, x in v["inputs"].items() if i in declared}}
    twin_diff = [] if same(twin, exported) else [
        f"{k}: {twin.get(k)} vs editor {exported.get(k)}" for k in sorted(set(twin) | set(exported), key=str)
        if not same(twin.get(k), exported.get(k))]
    return {"saved_nodes": len(saved["nodes"]), "saved_links": len(saved["links"]), "missing": missing,
            "mismatches": mismatches, "schema": schema, "outside": outside, "files": files, "editor_only": extra,
            "twin_diff": twin_diff if r["prompt"] is not None else [f"graphToPrompt failed: {r['prompt_error']}"]}


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
