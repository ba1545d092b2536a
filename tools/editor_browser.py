"""The browser side of tools/editor_check.py: headless Chromium over Chrome's DevTools protocol, and the scripts
it runs in ComfyUI's editor page (the frontend's own stores and commands, comfyui-frontend-package 1.35).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time

# requests and messages of an idle editor on an offline machine, unrelated to the pack
IGNORED = re.compile(r"/user\.css|/favicon\.ico|/api/userdata|api\.comfy\.org|ERR_NAME_NOT_RESOLVED|"
                     r"ERR_INTERNET_DISCONNECTED|ERR_CONNECTION_REFUSED.*comfy\.org")

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
  // the browser shows 24 cards per page and loads the next page when its end scrolls into view (frontend 1.35)
  const card = await __alc.until(() => {
    const c = dlg.querySelector(`[data-testid="template-workflow-${name}"]`);
    if (!c) dlg.querySelectorAll('*').forEach(e => {
      if (e.scrollHeight > e.clientHeight) e.scrollTop = e.scrollHeight;
    });
    return c;
  });
  if (!card) return {problem: 'no card in the template browser (scrolled to its end)'};
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
