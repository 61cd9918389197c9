"""Milvus' limits on what a row holds, known without importing pymilvus: the API checks uploads
against them before any work is queued, and the store checks every row it writes."""

VARCHAR_MAX = 65_535  # Milvus' limit for one VARCHAR value, in bytes
ID_MAX = 512  # bytes of a doc_id
FILENAME_MAX = 1024  # bytes of a filename
