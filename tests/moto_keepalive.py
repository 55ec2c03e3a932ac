"""moto's S3 app served by waitress (HTTP/1.1 keep-alive): ``python moto_keepalive.py PORT``.

moto's own server (werkzeug) sends ``Connection: close`` with every response, so every request
of every client pays a TCP connect; S3 keeps connections open. One line per request goes to
stdout, as werkzeug logs them (``"PUT /bucket/key HTTP/1.1" 200``), for counting at the server.
"""

import os
import sys

import waitress
from moto.server import DomainDispatcherApplication, create_backend_app


def logged(app):
    def wrapper(environ, start_response):
        target = environ.get("RAW_URI") or environ["PATH_INFO"]
        if environ.get("QUERY_STRING") and "?" not in target:
            target += "?" + environ["QUERY_STRING"]

        def start(status, headers, exc_info=None):
            line = f'127.0.0.1 - - "{environ["REQUEST_METHOD"]} {target} HTTP/1.1" {status[:3]} -\n'
            os.write(1, line.encode())  # one write per line (O_APPEND): whole lines from any thread
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wrapper


if __name__ == "__main__":
    app = logged(DomainDispatcherApplication(create_backend_app))
    waitress.serve(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        threads=8,
        connection_limit=4096,
        backlog=1024,
        _quiet=True,
    )  # idle keep-alive connections of several clients stay open: no limit at 100
