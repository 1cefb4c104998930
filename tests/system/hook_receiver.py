"""The abuse desk's end of the webhook, inside the system tier's machine:
`python hook_receiver.py PORT FILE` appends each POSTed JSON body to FILE
(one line each; FILE is created empty once it listens)."""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path


def main() -> None:
    port, path = int(sys.argv[1]), Path(sys.argv[2])

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with path.open("a") as f:
                f.write(json.dumps(body) + "\n")
            self.send_response(204)
            self.end_headers()

    server = HTTPServer(("127.0.0.1", port), Hook)
    path.write_text("")
    server.serve_forever()


if __name__ == "__main__":
    main()
