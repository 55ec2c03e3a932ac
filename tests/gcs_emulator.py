"""Run gcp-storage-emulator with two fixes for tests: ``python gcs_emulator.py PORT``.

1. A listen backlog of 128 (the default 5 drops SYNs under concurrent clients, 1 s stalls).
2. Multipart uploads are split on the boundary bytes (gcsfs separates parts with bare LFs). The emulator parses them with the
   ``email`` package, which strips a trailing ``\\r`` from the object's content: any object
   whose last byte is 0x0D was stored one byte short (seen as crc32c mismatches here).
"""

import http.server
import json
import re
import sys

import gcp_storage_emulator.server as server
from gcp_storage_emulator.__main__ import main

http.server.HTTPServer.request_queue_size = 128
_original = server._read_data


def _read_data(request_handler, query):
    content_type = request_handler.headers.get("Content-Type") or ""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/related") or not match:
        return _original(request_handler, query)
    raw = server._decode_raw_data(server._read_raw_data(request_handler), request_handler)
    parts = raw.split(b"--" + match.group(1).encode())[1:-1]
    bodies = []
    for part in parts:
        newline = b"\r\n" if b"\r\n\r\n" in part else b"\n"  # gcsfs writes bare LFs
        headers, _, body = part.partition(newline * 2)
        bodies.append((headers, body[: -len(newline)]))  # the line break before the boundary
    _, meta = bodies[0]
    data_headers, content = bodies[1]
    ctype = re.search(rb"(?i)content-type:\s*([^\r\n;]+)", data_headers)
    return {
        "meta": json.loads(meta),
        "content": content,
        "content-type": ctype.group(1).decode() if ctype else "application/octet-stream",
    }


server._read_data = _read_data

if __name__ == "__main__":
    port = sys.argv[1]
    sys.exit(main(["start", "--host", "127.0.0.1", "--in-memory", "-q", "--port", port]))
