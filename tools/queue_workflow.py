"""Queue an API-format workflow on a running ComfyUI and wait for its outputs.

    python tools/queue_workflow.py workflows/api/attention_capture_shapesworld_api.json --server http://127.0.0.1:8188

Prints the status and the output files of every output node; exits 1 on an execution error.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
import uuid


def call(url: str, data: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow")
    p.add_argument("--server", default="http://127.0.0.1:8188")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args(argv)
    prompt = json.load(open(args.workflow))
    prompt = {k: {kk: vv for kk, vv in v.items() if kk != "_meta"} for k, v in prompt.items()}
    try:
        pid = call(f"{args.server}/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})["prompt_id"]
    except urllib.error.HTTPError as e:
        print("rejected:", e.read().decode(), file=sys.stderr)
        return 1
    t0 = time.time()
    while time.time() - t0 < args.timeout:
        hist = call(f"{args.server}/history/{pid}")
        if pid in hist:
            entry = hist[pid]
            status = entry["status"]["status_str"]
            print(f"{status} in {time.time() - t0:.1f} s")
            for node, out in entry.get("outputs", {}).items():
                for kind, items in out.items():
                    names = [i.get("filename", i) if isinstance(i, dict) else i for i in items]
                    print(f"  node {node} {kind}: {names}")
            for ev, data in entry["status"].get("messages", []):
                if ev == "execution_error":
                    print("  error:", data.get("exception_message"), file=sys.stderr)
            return 0 if status == "success" else 1
        time.sleep(0.5)
    print("timed out", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
