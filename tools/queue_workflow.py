"""Queue an API-format workflow on a running ComfyUI and wait for its outputs.

    python tools/queue_workflow.py workflows/api/attention_capture_shapesworld_api.json --server http://127.0.0.1:8188

Prints the status and the output files of every output node; exits 1 on an execution error or a
timeout, 2 on a bad argument, a file that is not an API-format workflow, or a server that cannot be
reached. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention import cli  # noqa: E402  (standard library only)


def call(url: str, data: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def server_url(text: str) -> str:
    """argparse type: an http(s) URL without a trailing slash."""
    if not text.startswith(("http://", "https://")) or len(text.split("://", 1)[1]) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a server URL: give http://HOST:PORT, "
                                             f"e.g. http://127.0.0.1:8188")
    return text.rstrip("/")


def build_parser():
    p = cli.parser(__doc__)
    p.add_argument("workflow", type=cli.existing_file,
                   help="API-format workflow JSON (the *_api.json files in workflows/)")
    p.add_argument("--server", type=server_url, default="http://127.0.0.1:8188", help="ComfyUI's address")
    p.add_argument("--timeout", type=cli.float_range(0, lo_open=True), default=600,
                   help="seconds to wait for the run to finish")
    return p


def load_api_workflow(p, path: str) -> dict:
    """The workflow as /prompt wants it, or parser.error naming what is wrong with the file."""
    try:
        prompt = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        p.error(f"argument workflow: {path} is not JSON ({e}): give an API-format workflow file")
    if isinstance(prompt, dict) and "nodes" in prompt and "links" in prompt:
        twin = Path(path).with_name(Path(path).stem + "_api.json")
        hint = f" ({twin} is its twin)" if twin.is_file() else ""
        p.error(f"argument workflow: {path} is a graph-editor (UI) file: give its API-format twin{hint}, or "
                f"export one with 'Export (API)' in ComfyUI")
    if not (isinstance(prompt, dict) and prompt and all(isinstance(v, dict) and "class_type" in v
                                                        for v in prompt.values())):
        p.error(f"argument workflow: {path} is not an API-format workflow (a map of node ids to "
                f"{{class_type, inputs}}): give one of the *_api.json files")
    return {k: {kk: vv for kk, vv in v.items() if kk != "_meta"} for k, v in prompt.items()}


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    prompt = load_api_workflow(p, args.workflow)
    try:
        pid = call(f"{args.server}/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})["prompt_id"]
    except urllib.error.HTTPError as e:
        print("rejected:", e.read().decode(), file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        p.error(f"argument --server: no ComfyUI answers at {args.server} ({getattr(e, 'reason', e)}): start "
                f"ComfyUI (python main.py --listen 127.0.0.1 --port 8188) or pass --server with its address")
    t0 = time.time()
    while time.time() - t0 < args.timeout:
        try:
            hist = call(f"{args.server}/history/{pid}")
        except (urllib.error.URLError, OSError) as e:
            print(f"lost the server at {args.server} while waiting ({getattr(e, 'reason', e)})", file=sys.stderr)
            return 1
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
    print(f"timed out after {args.timeout:g} s (the run may still finish in ComfyUI; raise --timeout)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
