"""Where input rows come from when they are not an upstream asset: Parquet on storage.

Example:
    >>> src = ParquetSource("s3://lake/reviews/date={partition_key}/*.parquet")
    >>> table = src.read("2026-11-24")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

__all__ = ["ParquetSource"]


@dataclass(frozen=True)
class ParquetSource:
    """Parquet input named by a path template with ``{partition_key}``: a file, folder or glob.

    Example:
        >>> ParquetSource("/data/reviews/{partition_key}.parquet").path_for("2026-11-24")
        '/data/reviews/2026-11-24.parquet'
    """

    path_template: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def path_for(self, partition_key: str | None) -> str:
        """The template with the partition key filled in."""
        if "{partition_key}" in self.path_template and partition_key is None:
            raise ValueError("path_template uses {partition_key} but the asset is unpartitioned")
        return self.path_template.replace("{partition_key}", partition_key or "")

    def files(self, partition_key: str | None) -> list[UPath]:
        """The Parquet files for a partition, sorted; empty when nothing matches."""
        path = UPath(self.path_for(partition_key), **self.storage_options)
        if any(ch in path.path for ch in "*?["):
            return sorted(
                (
                    UPath(p, protocol=path.protocol, **self.storage_options)
                    for p in path.fs.glob(path.path)
                ),
                key=str,
            )
        if path.is_dir():
            return sorted((p for p in path.rglob("*.parquet")), key=str)
        return [path] if path.exists() else []

    def read(self, partition_key: str | None) -> pa.Table:
        """All rows of a partition as one table. A missing path is an error naming it."""
        files = self.files(partition_key)
        if not files:
            raise FileNotFoundError(f"no Parquet input at {self.path_for(partition_key)!r}")
        tables = []
        for file in files:
            with file.open("rb") as fh:
                tables.append(pq.read_table(fh))
        return pa.concat_tables(tables, promote_options="permissive")
