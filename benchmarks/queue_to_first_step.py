"""Seconds from queueing an API-format workflow to the first sampling step of one of its nodes.

    python benchmarks/queue_to_first_step.py workflows/api/prompt_mixing_api.json --server http://127.0.0.1:8199

Queues the workflow on a running ComfyUI, follows its websocket (aiohttp, which ComfyUI installs: run it with
ComfyUI's python) and prints, in seconds after the POST: when each node starts, the watched node's progress
bars (a proxy search counts vocabulary prompts, a sampler counts steps) and the first step of the sampling
bar, i.e. the first progress value of a bar whose maximum is the node's ``steps``. With ``--interrupt`` it then
interrupts the run (a 50-step CPU run of SD1.5 at 512 px takes hours); otherwise it waits for the end.
The watched node is ``--node``, default the first node with a ``steps`` input.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from attention import cli  # noqa: E402


async def run(args, workflow: dict, node: str, steps: int) -> int:
    import aiohttp
    client = uuid.uuid4().hex
    ws_url = args.server.replace("http", "ws", 1) + f"/ws?clientId={client}"
    bars: dict[int, list] = {}            # bar maximum -> [first time, last value]
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url, max_msg_size=0) as ws:
        t0 = time.perf_counter()
        async with s.post(args.server + "/prompt", json={"prompt": workflow, "client_id": client}) as r:
            if r.status != 200:
                print("rejected:", await r.text(), file=sys.stderr)
                return 1
            pid = (await r.json())["prompt_id"]

        def now():
            return time.perf_counter() - t0
        first_step = None
        while True:
            try:
                msg = await ws.receive(timeout=args.timeout - now())
            except asyncio.TimeoutError:
                print(f"timed out after {args.timeout:g} s", file=sys.stderr)
                return 1
            if msg.type != aiohttp.WSMsgType.TEXT:
                if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    print("the server closed the websocket", file=sys.stderr)
                    return 1
                continue                                   # binary: preview images
            m = json.loads(msg.data)
            kind, data = m.get("type"), m.get("data", {})
            if data.get("prompt_id") not in (None, pid):
                continue
            if kind == "executing" and data.get("node") is not None:
                print(f"{now():8.1f} s  node {data['node']} ({workflow[data['node']]['class_type']}) starts")
            elif kind == "progress" and str(data.get("node")) == node:
                value, top = data["value"], data["max"]
                bar = bars.setdefault(top, [now(), 0])
                if value * 10 // top != bar[1] * 10 // top or value == top or bar[1] == 0:
                    print(f"{now():8.1f} s  node {node} progress {value:,} / {top:,}")
                bar[1] = value
                if top == steps and value >= 1 and first_step is None:
                    first_step = now()
                    print(f"{first_step:8.1f} s  FIRST SAMPLING STEP of node {node} ({steps} steps)")
                    if args.interrupt:
                        async with s.post(args.server + "/interrupt", json={}) as r:
                            pass
            elif kind in ("execution_error", "execution_interrupted", "execution_success"):
                print(f"{now():8.1f} s  {kind}" + (f": {data.get('exception_message')}" if kind ==
                                                     "execution_error" else ""))
                if first_step is not None:
                    print(f"queue to first step: {first_step:.1f} s")
                return 0 if kind == "execution_success" or (first_step is not None and args.interrupt) else 1


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("workflow", type=cli.existing_file, help="API-format workflow JSON")
    p.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI's address, http://HOST:PORT")
    p.add_argument("--node", default=None, help="id of the node to watch (default: the first with 'steps')")
    p.add_argument("--interrupt", action="store_true", help="interrupt the run after the first sampling step")
    p.add_argument("--timeout", type=cli.float_range(0, lo_open=True), default=3600, help="seconds to wait")
    args = p.parse_args(argv)
    workflow = json.loads(Path(args.workflow).read_text())
    node = args.node or next((k for k, v in workflow.items() if "steps" in v.get("inputs", {})), None)
    if node not in workflow or not isinstance(workflow[node]["inputs"].get("steps"), int):
        p.error(f"argument --node: {node!r} is not a node of {args.workflow} with an integer 'steps' input: give "
                f"one of {[k for k, v in workflow.items() if 'steps' in v.get('inputs', {})]}")
    return asyncio.run(run(args, workflow, node, workflow[node]["inputs"]["steps"]))


if __name__ == "__main__":
    sys.exit(main())
