"""How many pages a provider's PDF reader can find in a document: the bound of a PDF part.

Hostile-input safe, as :mod:`broker.money.media` is: on arbitrary bytes :func:`pdf_pages` returns or
raises :class:`broker.money.media.MediaError`, nothing else, and what pypdf may decode is budgeted.
"""

from __future__ import annotations

import math
import re
from io import BytesIO
from typing import Final

import pypdf
from pypdf.generic import ArrayObject, DictionaryObject, IndirectObject, PdfObject, StreamObject

from broker.money.media import MediaError

# What one PDF may make pypdf decode. Object streams hold the page tree of most PDFs written
# since 2003 and zlib inflates about 1000:1, so a few MB could otherwise cost gigabytes of
# memory, and pypdf parses what it decodes at about 10 MB a second. Real object streams are tens
# of KB; a 1000-page document's page tree touches a few MB of them.
_PDF_STREAM_LIMIT = 2 * 1024 * 1024  # decoded bytes of one stream
_PDF_OBJECT_STREAM_BUDGET = 8 * 1024 * 1024  # decoded object streams parsed for one count
_PDF_XREF_ENTRIES = 250_000  # a few-MB PDF with a plain xref table cannot have more
_PDF_TREE_DEPTH = 64  # real page trees are a handful of levels deep
# "<number> <generation> obj" as a reader that rebuilds a broken xref finds it.
_PDF_OBJECT_HEADER = re.compile(
    rb"(?<![0-9])([0-9]{1,10})[\0\t\n\f\r ]+([0-9]{1,5})[\0\t\n\f\r ]+obj(?![^\0\t\n\f\r ()<>\[\]{}/%])")
_PDF_NOT_WHITESPACE = re.compile(rb"[^\0\t\n\f\r ]")
_PDF_LIMITS: Final = {
    name: _PDF_STREAM_LIMIT
    for name in (
        "array_based_stream_maximum_output_length",
        "brotli_maximum_output_length",
        "jbig2_maximum_output_length",
        "lzw_maximum_output_length",
        "run_length_maximum_output_length",
        "zlib_maximum_output_length",
        "stream_decoding_work_maximum_length",
    )
}


def pdf_pages(data: bytes, *, max_pages: int = 1000) -> int:
    """An upper bound on the pages a provider's PDF reader finds in ``data``.

    Readers disagree on hostile files: pypdf counts the page tree's leaves, MuPDF reads the
    root's ``/Count``, pdfium reads any node's ``/Count`` that looks sane and walks the rest.
    The bound is, at every node of the tree, the larger of its ``/Count`` and the sum over its
    children, which covers every mixture of the two. A node is a branch when it has ``/Kids``
    (pdfium's test); one whose ``/Type`` says otherwise is refused.

    Raises :class:`MediaError` when ``data`` is not a PDF (no ``%PDF-`` at the start); is
    encrypted and does not open with the empty password (nor would providers' readers); fails
    pypdf's strict mode (most files that need repair: a repaired reading is one guess among
    several); has a page tree readers could resolve differently (a node reached twice, nested
    deeper than 64, typed against its ``/Kids``, or an object that is not the last definition of
    its number, see below); makes pypdf decode more than the limits above; or counts more than
    ``max_pages`` pages.

    Strict pypdf still repairs an unreadable xref entry by searching the file for the object and
    taking its first definition, where readers that rebuild an xref take the last. So a page
    tree object must be in the xref and be the last "<number> <generation> obj" of the file (as
    in any file updated by appending), and one in an object stream must have no such definition.
    A file whose text merely contains such words after the object is refused too.
    """
    if not isinstance(data, bytes | bytearray) or not data.startswith(b"%PDF-"):
        raise MediaError("not a PDF")
    try:
        # A context variable: the limits hold for this call only, in any thread or task.
        with pypdf.apply_configuration(pypdf.get_configuration().with_overwrites(**_PDF_LIMITS)):
            reader = pypdf.PdfReader(
                BytesIO(data),
                strict=True,
                root_object_recovery_limit=0,
                xref_stream_maximum_entries=_PDF_XREF_ENTRIES,
            )
            if reader.is_encrypted and reader.decrypt("") == pypdf.PasswordType.NOT_DECRYPTED:
                raise MediaError("PDF is encrypted and needs a password")
            return _PageCounter(reader, bytes(data), max_pages).count()
    except MediaError:
        raise
    except Exception as exc:
        # pypdf raises many types on hostile input (PdfReadError, LimitReachedError, KeyError,
        # AssertionError, RecursionError, ...), and its messages may quote the file's bytes.
        raise MediaError(f"unreadable PDF ({type(exc).__name__})") from None


class _PageCounter:
    """Walks a page tree through pypdf's objects, resolving references itself to meter them."""

    def __init__(self, reader: pypdf.PdfReader, data: bytes, max_pages: int) -> None:
        self._reader = reader
        self._data = data
        self._max_pages = max_pages
        self._definitions: dict[tuple[int, int], int] | None = None
        self._leaves = 0
        self._branches: set[int] = set()
        self._object_streams: set[int] = set()
        self._decoded = 0

    def count(self) -> int:
        root = self._resolve(self._reader.trailer.raw_get("/Root"))
        if not isinstance(root, DictionaryObject) or "/Pages" not in root:
            raise MediaError("PDF has no page tree")
        pages = self._resolve(root.raw_get("/Pages"))
        if not isinstance(pages, DictionaryObject):
            raise MediaError("PDF has a broken page tree")
        return self._node(pages, 0)

    def _node(self, node: DictionaryObject, depth: int) -> int:
        kind = self._name(node.raw_get("/Type")) if "/Type" in node else None
        declared = self._declared_count(node)
        if "/Kids" not in node:
            if kind not in (None, "/Page"):
                raise MediaError("PDF page tree has a page that says it is not one")
            self._leaves += 1
            counted = 1
        else:
            if kind not in (None, "/Pages"):
                raise MediaError("PDF page tree has a branch that says it is not one")
            if depth >= _PDF_TREE_DEPTH:
                raise MediaError("PDF page tree is too deep")
            if id(node) in self._branches:
                raise MediaError("PDF page tree reaches a node twice")
            self._branches.add(id(node))
            if len(self._branches) > self._max_pages + _PDF_TREE_DEPTH:
                raise MediaError("PDF page tree has too many nodes")
            kids = self._resolve(node.raw_get("/Kids"))
            if not isinstance(kids, ArrayObject):
                raise MediaError("PDF page tree has a broken /Kids")
            counted = 0
            for kid in kids:
                child = self._resolve(kid)
                if not isinstance(child, DictionaryObject):
                    raise MediaError("PDF page tree has a broken /Kids")
                counted += self._node(child, depth + 1)
        total = max(declared, counted)
        if total > self._max_pages or self._leaves > self._max_pages:
            raise MediaError(f"PDF has more than {self._max_pages} pages")
        return total

    def _name(self, value: object) -> str:
        name = self._resolve(value)
        return str(name) if isinstance(name, str) else ""

    def _declared_count(self, node: DictionaryObject) -> int:
        if "/Count" not in node:
            return 0
        count = self._resolve(node.raw_get("/Count"))
        if isinstance(count, int) and not isinstance(count, bool):
            return count
        if isinstance(count, float) and math.isfinite(count):
            return math.ceil(count)
        return 0

    def _resolve(self, value: object) -> PdfObject | None:
        if not isinstance(value, IndirectObject):
            return value if isinstance(value, PdfObject) else None
        number, generation = value.idnum, value.generation
        holder = self._reader.xref_objStm.get(number) if generation == 0 else None
        if holder is None:
            # Missing from the xref, pypdf would search the file for the object.
            offset = self._reader.xref.get(generation, {}).get(number)
            header = _PDF_NOT_WHITESPACE.search(self._data, offset) if isinstance(offset, int) else None
            if header is None:
                raise MediaError("PDF page tree names an object its xref does not have")
            if self._last_definition(number, generation) != header.start():
                raise MediaError("PDF defines a page tree object twice, and readers differ on which counts")
        else:
            if self._last_definition(number, 0) is not None:
                raise MediaError("PDF defines a page tree object twice, and readers differ on which counts")
            # pypdf decodes and parses the whole object stream, and keeps it for the reader's
            # life: the stream is decoded here first (the cheap part, which pypdf then reuses)
            # and metered before pypdf parses it.
            if holder[0] not in self._object_streams:
                self._object_streams.add(holder[0])
                stream = self._reader.get_object(holder[0])
                if isinstance(stream, StreamObject):
                    self._decoded += len(stream.get_data())
                if self._decoded > _PDF_OBJECT_STREAM_BUDGET:
                    raise MediaError("PDF's page tree needs too much decompression")
        return value.get_object()

    def _last_definition(self, number: int, generation: int) -> int | None:
        """Where the file's last "<number> <generation> obj" starts, outside object streams."""
        if self._definitions is None:
            headers = _PDF_OBJECT_HEADER.finditer(self._data)
            self._definitions = {(int(match[1]), int(match[2])): match.start() for match in headers}
        return self._definitions.get((number, generation))
