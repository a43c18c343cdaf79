"""Read and replace columns of a Ray Data batch, which is an Arrow table inside the pipeline and a dict of
numpy arrays in tests; the stages that drop rows with a reason (dedup, mix) work on both:

    status, reason = column_values(batch, "status"), column_values(batch, "reason")
    status[hit], reason[hit] = DROPPED, "mix_subsampled"
    return replace_columns(batch, status=status, reason=reason)
"""

from __future__ import annotations

import numpy as np


def column_values(batch, name: str) -> np.ndarray:
    """A writable numpy copy of one column; strings come back as an object array."""
    column = batch[name]
    values = column.to_numpy(zero_copy_only=False) if hasattr(column, "to_numpy") else np.asarray(column)
    return values.astype(object) if values.dtype.kind in "OUS" else values


def replace_columns(batch, **columns: np.ndarray):
    """`batch` with some string columns replaced: Arrow tables stay Arrow (their list columns untouched)."""
    if isinstance(batch, dict):
        return batch | columns
    import pyarrow as pa

    for name, values in columns.items():
        batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values.tolist(), pa.string()))
    return batch
