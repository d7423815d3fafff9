"""A peer that lies or hangs, for tests/test_p2p_netns.py: a fake, because the real peer server
(dadi/p2p/peer.py) re-checks every chunk it serves and cannot be made to misbehave without test hooks in
product code.

    python lying_peer.py SUPERNODE_URL PORT DIGEST PIECES [lie|hang]

It announces that it holds pieces 0..PIECES-1 of blob DIGEST (the real announce protocol, every second).
`lie` (the default) answers every range GET with as many 0xff bytes as asked for (a well-formed 206 with
the right Content-Range: only the bytes are wrong) and prints "served N"; `hang` accepts the request,
prints "hanging" and never answers.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    supernode, port, digest, pieces = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    mode = sys.argv[5] if len(sys.argv) > 5 else "lie"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if mode == "hang":
                print("hanging", flush=True)
                threading.Event().wait()
            start, end = map(int, re.match(r"bytes=(\d+)-(\d+)", self.headers["Range"]).groups())
            body = b"\xff" * (end - start + 1)
            self.send_response(206)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Range", f"bytes {start}-{end}/*")
            self.end_headers()
            self.wfile.write(body)
            print(f"served {len(body)}", flush=True)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    body = json.dumps({"port": port, "full": True, "add": [{"digest": digest, "pieces": list(range(pieces))}]})
    while True:
        try:
            request = urllib.request.Request(supernode + "/p2p/announce", data=body.encode(),
                                             headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=5).read()
            print("announced", flush=True)
        except OSError as e:
            print(f"announce failed: {e}", flush=True)
        time.sleep(1.0)


if __name__ == "__main__":
    main()
