"""Reading an image upload within limits, while it streams in: nothing past a limit is ever buffered.

The body of ``POST /v1/score`` is ``multipart/form-data``: file parts in the field ``files``, and
short text fields (``model``, ``explain``). It is parsed as it arrives (python-multipart's streaming
parser) and counted as it arrives, so that neither a body larger than ``max_request_bytes`` nor a
Content-Length that lies can make the server hold more; a file over ``max_file_bytes`` stops being
kept at its limit (its result carries the error, the other files are scored); one file part more
than ``max_images`` ends the upload. Files are kept in memory, never written to disk, and a client's
file name is only ever a label (made printable, shortened), never a path.

Example:
    >>> body = (b'--b\\r\\nContent-Disposition: form-data; name="explain"\\r\\n\\r\\n2\\r\\n'
    ...         b'--b\\r\\nContent-Disposition: form-data; name="files"; filename="a.png"\\r\\n\\r\\nPNG...\\r\\n--b--\\r\\n')
    >>> reader = UploadReader("multipart/form-data; boundary=b", max_file_bytes=100, max_request_bytes=1000, max_images=4)
    >>> reader.feed(body); upload = reader.finish()
    >>> upload.fields, [(f.name, f.data, f.error) for f in upload.files]
    ({'explain': '2'}, [('a.png', b'PNG...', None)])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header

from ..images import printable

__all__ = ["FIELDS", "UploadError", "UploadReader", "Upload", "UploadedFile"]

#: the text fields a score request may carry, with the longest value accepted for each
FIELDS = {"model": 64, "explain": 8}
_FILE_FIELD = "files"
_MAX_NAME = 200  # characters of a client's file name kept as the image's label


class UploadError(Exception):
    """A request refused as a whole: ``status`` (400, 413, 415) and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class UploadedFile:
    """One uploaded file: its label, its bytes (empty if refused), and why it was refused."""

    name: str
    data: bytes = b""
    error: str | None = None


@dataclass
class Upload:
    files: list[UploadedFile] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)


class UploadReader:
    """Feed it the body's chunks as they arrive (:meth:`feed`), then :meth:`finish`; raises :class:`UploadError`."""

    def __init__(self, content_type: str | None, *, max_file_bytes: int, max_request_bytes: int, max_images: int):
        kind, options = parse_options_header(content_type or "")
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise UploadError(415, "send the images as multipart/form-data, in the field 'files'")
        self.max_file_bytes, self.max_request_bytes, self.max_images = max_file_bytes, max_request_bytes, max_images
        self.received = 0
        self.upload = Upload()
        self._headers: dict[bytes, bytes] = {}
        self._header_field = b""
        self._header_value = b""
        self._field: str | None = None  # the text field being read, or None in a file part
        self._chunks: list[bytes] = []
        self._size = 0
        self._file: UploadedFile | None = None
        self._ended = False
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin, "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end,
        })

    def feed(self, chunk: bytes) -> None:
        """Count and parse the next piece of the body."""
        self.received += len(chunk)
        if self.received > self.max_request_bytes:
            raise UploadError(413, f"request body larger than {self.max_request_bytes} bytes (--max-request-mb)")
        try:
            self._parser.write(chunk)
        except UploadError:
            raise
        except Exception as e:  # python-multipart's own errors: a malformed body
            raise UploadError(400, f"malformed multipart body: {e}") from None

    def finish(self) -> Upload:
        """The upload, once the body is complete; a truncated body is a 400."""
        if not self._ended:
            raise UploadError(400, "malformed multipart body: it ends before its closing boundary")
        if not self.upload.files:
            raise UploadError(400, "no image: send one or more files in the field 'files'")
        return self.upload

    # -- parser callbacks ---------------------------------------------------------------------
    def _part_begin(self) -> None:
        self._headers, self._chunks, self._size = {}, [], 0
        self._field, self._file = None, None

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.strip().lower()] = self._header_value.strip()
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or not name:
            raise UploadError(400, "malformed multipart body: a part without a form-data name")
        if name == _FILE_FIELD:
            if len(self.upload.files) >= self.max_images:
                raise UploadError(413, f"more than {self.max_images} images in one request (--max-images)")
            raw = options.get(b"filename")
            label = printable(raw.decode("utf-8", "replace")) if raw else ""
            self._file = UploadedFile(label[:_MAX_NAME] or f"files[{len(self.upload.files)}]")
            self.upload.files.append(self._file)
        elif name in FIELDS:
            if name in self.upload.fields:
                raise UploadError(400, f"the field {name!r} is given twice")
            self._field = name
        else:
            raise UploadError(400, f"unknown field {printable(name)[:64]!r}: a score request has 'files', "
                                   f"{', '.join(repr(f) for f in FIELDS)}")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        size = end - start
        self._size += size
        if self._file is not None:
            if self._file.error is None and self._size > self.max_file_bytes:
                self._file.error = f"{self._file.name}: file larger than {self.max_file_bytes} bytes (--max-file-mb)"
                self._chunks = []  # dropped: the rest of this part is only counted
            if self._file.error is None:
                self._chunks.append(data[start:end])
        elif self._field is not None:
            if self._size > FIELDS[self._field]:
                raise UploadError(413, f"the field {self._field!r} is longer than {FIELDS[self._field]} characters")
            self._chunks.append(data[start:end])

    def _part_end(self) -> None:
        if self._file is not None and self._file.error is None:
            self._file.data = b"".join(self._chunks)
            if not self._file.data:
                self._file.error = f"{self._file.name}: empty file"
        elif self._field is not None:
            self.upload.fields[self._field] = b"".join(self._chunks).decode("utf-8", "replace").strip()
        self._chunks = []

    def _end(self) -> None:
        self._ended = True
