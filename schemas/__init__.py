"""Avro schemas (``*.avsc``, namespace ``io.postback.v1``) of every record on our topics.

The ``.avsc`` files are the contract; ``schemas.codec`` turns them into bytes and back.
"""

from pathlib import Path

#: Directory holding the ``.avsc`` files; a record's schema is ``SCHEMA_DIR / f"{name}.avsc"``.
SCHEMA_DIR: Path = Path(__file__).resolve().parent
