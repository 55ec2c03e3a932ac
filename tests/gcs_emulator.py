"""Run gcp-storage-emulator with fixes for tests: ``python gcs_emulator.py PORT``.

1. A listen backlog of 128 (the default 5 drops SYNs under concurrent clients, 1 s stalls).
2. Multipart uploads are split on the boundary bytes (gcsfs separates parts with bare LFs). The
   emulator parses them with the ``email`` package, which strips a trailing ``\\r`` from the
   object's content: any object whose last byte is 0x0D was stored one byte short (seen as
   crc32c mismatches here).
3. Preconditions are enforced, as GCS does (and media downloads say ``x-goog-generation``): ``ifGenerationMatch`` / ``ifGenerationNotMatch``
   on JSON-API uploads (gcsfs's ``mode="create"`` sends ``ifGenerationMatch=0``) and
   ``x-goog-if-generation-match`` / ``x-goog-if-generation-not-match`` on XML-API PUTs; a
   failed one is ``412 Precondition Failed`` and writes nothing. The emulator itself ignores
   them (a second "create" silently overwrote). The server is single-threaded, so check and
   write are atomic.
4. The XML API that obstore's GCS client (Rust ``object_store``) speaks: object GET/HEAD/PUT/
   DELETE answer with ``ETag``, ``Last-Modified`` and ``x-goog-generation`` headers, and a
   bucket GET with ``list-type=2`` lists (prefix, delimiter, continuation tokens, at most
   ``max-keys`` a page). The emulator answered 501 to listing, HEAD and DELETE, and sent no
   ETag or generation.
5. Deleted objects are gone (no soft-delete copies kept in memory for seven days).
6. A ``;`` in an object name is kept: the emulator split request paths with ``urlparse``,
   which cuts a last segment's ``;params`` off (aiohttp sends gcsfs's ``%3B`` as ``;``).
7. Server-side copies (an XML-API ``PUT`` with ``x-goog-copy-source``, obstore's ``copy``) and
   empty objects: the emulator read the missing body as None and failed every such request
   (obstore retried with back-off, seconds per save, then wrote the bytes itself).
"""

import base64
import email.utils
import http.server
import json
import re
import sys
import urllib.parse
from datetime import UTC, datetime
from http import HTTPStatus
from xml.sax.saxutils import escape

import gcp_storage_emulator.server as server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.storage import Storage

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
server.urlparse = urllib.parse.urlsplit  # no ";params" split off the path
Storage._bucket_soft_delete_retention_seconds = lambda self, bucket_name: 0


# --- preconditions -------------------------------------------------------------------------


def _generation(storage, bucket: str, name: str) -> int:
    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return 0  # GCS: generation 0 means "no live object"


def _holds(storage, bucket: str, name: str, match, not_match) -> bool:
    current = _generation(storage, bucket, name)
    return (match is None or int(match) == current) and (
        not_match is None or int(not_match) != current
    )


def _precondition_failed(response) -> None:
    response.status = HTTPStatus.PRECONDITION_FAILED
    body = "<Error><Code>PreconditionFailed</Code><Message>At least one of the pre-conditions you specified did not hold.</Message></Error>"
    response.write_file(body.encode(), "application/xml")


_insert = objects.insert
_download = objects.download


def download(request, response, storage, *args, **kwargs):
    """JSON-API media download, with ``x-goog-generation`` as GCS sends it (gcsfs reads it)."""
    _download(request, response, storage)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])


def insert(request, response, storage, *args, **kwargs):
    """JSON-API upload with ``ifGenerationMatch`` / ``ifGenerationNotMatch`` enforced."""
    query = request.query
    match = query.get("ifGenerationMatch", [None])[0]
    not_match = query.get("ifGenerationNotMatch", [None])[0]
    if match is not None or not_match is not None:
        name = query.get("name", [None])[0]
        if name is None and query.get("uploadType") == ["multipart"]:
            name = request.data["meta"].get("name")
        bucket = request.params["bucket_name"]
        if name is not None and not _holds(storage, bucket, name, match, not_match):
            return _precondition_failed(response)
    return _insert(request, response, storage, *args, **kwargs)


# --- the XML API ---------------------------------------------------------------------------


def _object_headers(response, obj) -> None:
    md5 = base64.b64decode(obj["md5Hash"]).hex() if obj.get("md5Hash") else obj["generation"]
    response["ETag"] = f'"{md5}"'
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    updated = datetime.strptime(obj["updated"], "%Y-%m-%dT%H:%M:%S.%fZ")
    response["Last-Modified"] = email.utils.format_datetime(
        updated.replace(tzinfo=UTC), usegmt=True
    )


def xml_put(request, response, storage, *args, **kwargs):
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    match = request.get_header("x-goog-if-generation-match")
    not_match = request.get_header("x-goog-if-generation-not-match")
    if not _holds(storage, bucket, name, match, not_match):
        return _precondition_failed(response)
    source = request.get_header("x-goog-copy-source")
    if source:
        return _xml_copy(request, response, storage, source, bucket, name)
    if request.data is None:  # (the emulator reads an empty body as None: an empty object)
        request._data = b""
    objects.xml_upload(request, response, storage)
    if response.status == HTTPStatus.OK:
        _object_headers(response, storage.get_file_obj(bucket, name))


def _xml_copy(request, response, storage, source: str, bucket: str, name: str) -> None:
    """A server-side copy: ``PUT`` with ``x-goog-copy-source: [/]bucket/object`` (both
    URL-encoded: object_store sends ``t%2Dbucket/run%2Fstep...``), answered with the new
    object's headers and a ``CopyObjectResult``."""
    src_bucket, _, src_name = source.lstrip("/").partition("/")
    unquote = urllib.parse.unquote
    try:
        objects._copy(
            request.base_url, storage, unquote(src_bucket), unquote(src_name), bucket, name
        )
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        body = "<Error><Code>NoSuchKey</Code><Message>No such object.</Message></Error>"
        response.write_file(body.encode(), "application/xml")
        return
    obj = storage.get_file_obj(bucket, name)
    _object_headers(response, obj)
    body = (
        '<?xml version="1.0" encoding="UTF-8"?><CopyObjectResult>'
        f"<LastModified>{obj['updated'][:23]}Z</LastModified>"
        f"<ETag>{response['ETag']}</ETag></CopyObjectResult>"
    )
    response.write_file(body.encode(), "application/xml")


def xml_get(request, response, storage, *args, **kwargs):
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    _download(request, response, storage)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        _object_headers(response, storage.get_file_obj(bucket, name))


def xml_head(request, response, storage, *args, **kwargs):
    xml_get(request, response, storage)
    response.head = True  # see _close: headers only, with the object's Content-Length


def xml_delete(request, response, storage, *args, **kwargs):
    try:
        storage.delete_file(request.params["bucket_name"], request.params["object_id"])
        response.status = HTTPStatus.NO_CONTENT
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND


def xml_list(request, response, storage, *args, **kwargs):
    """``GET /bucket?list-type=2``: ListObjectsV2, as GCS's XML API answers it."""
    query = {k: v[0] for k, v in request.query.items()}
    prefix, delimiter = query.get("prefix", ""), query.get("delimiter") or None
    try:
        objs, prefixes = storage.get_file_list(request.params["bucket_name"], prefix, delimiter)
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    entries = sorted([(o["name"], o) for o in objs] + [(p, None) for p in prefixes])
    after = query.get("continuation-token") or query.get("start-after")
    if after:
        after = base64.urlsafe_b64decode(after).decode() if "continuation-token" in query else after
        entries = [e for e in entries if e[0] > after]
    limit = int(query.get("max-keys", 1000))
    page, more = entries[:limit], len(entries) > limit
    out = ['<?xml version="1.0" encoding="UTF-8"?><ListBucketResult>']
    out.append(f"<Name>{escape(request.params['bucket_name'])}</Name>")
    out.append(f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount>")
    out.append(f"<MaxKeys>{limit}</MaxKeys><IsTruncated>{str(more).lower()}</IsTruncated>")
    if more:
        token = base64.urlsafe_b64encode(page[-1][0].encode()).decode()
        out.append(f"<NextContinuationToken>{token}</NextContinuationToken>")
    for key, obj in page:
        if obj is None:
            out.append(f"<CommonPrefixes><Prefix>{escape(key)}</Prefix></CommonPrefixes>")
        else:
            md5 = base64.b64decode(obj["md5Hash"]).hex() if obj.get("md5Hash") else ""
            modified = obj["updated"][:23] + "Z"
            out.append(
                f"<Contents><Key>{escape(key)}</Key><Generation>{obj['generation']}</Generation>"
                f'<LastModified>{modified}</LastModified><ETag>"{md5}"</ETag>'
                f"<Size>{obj['size']}</Size></Contents>"
            )
    out.append("</ListBucketResult>")
    response.write_file("".join(out).encode(), "application/xml")


_response_close = server.Response.close


def _close(self):
    if not getattr(self, "head", False):
        return _response_close(self)
    self._handler.send_response(self.status.value, self.status.phrase)
    for k, v in self._headers.items():
        self._handler.send_header(k, v)
    self._handler.send_header("Content-Length", str(len(self._content)))
    self._handler.end_headers()


server.Response.close = _close
server.RequestHandler.do_HEAD = lambda self: server.Router(self).handle("HEAD")
objects.insert = insert
_XML_OBJECT = r"^/(?P<bucket_name>[-.\w]+)/(?P<object_id>.*[^/]+)$"
# object_store percent-encodes the bucket name too ("t-1" as "t%2D1"); names are unquoted once.
_BUCKET = r"^/(?P<bucket_name>[-.%\w]+)"
server.HANDLERS = (
    *(
        (regex, {m: {_insert: insert, _download: download}.get(h, h) for m, h in handlers.items()})
        for regex, handlers in server.HANDLERS
        if regex != _XML_OBJECT
    ),
    (
        _BUCKET + r"/(?P<object_id>.*[^/]+)$",
        {"GET": xml_get, "HEAD": xml_head, "PUT": xml_put, "DELETE": xml_delete},
    ),
    (_BUCKET + r"/?$", {"GET": xml_list}),
)

if __name__ == "__main__":
    port = sys.argv[1]
    sys.exit(main(["start", "--host", "127.0.0.1", "--in-memory", "-q", "--port", port]))
