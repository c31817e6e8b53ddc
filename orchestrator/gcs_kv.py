"""Ray's key-value store in the GCS, where a job's processes share state: the progress board, a cold start's model
plan, the workers' metric batches. Stdlib only: worker processes import it while they start."""

from __future__ import annotations

NAMESPACE = b"orch"


def client(needed_by: str):
    """This process's GCS client; `needed_by` names what asked, for the error when Ray is not connected."""
    from ray.experimental.internal_kv import internal_kv_get_gcs_client

    gcs = internal_kv_get_gcs_client()
    if gcs is None:
        raise RuntimeError(f"{needed_by} needs Ray: this process is not connected to a Ray cluster")
    return gcs
