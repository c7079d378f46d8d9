"""One recording's job, and the way back: the only place that composes keys + store + db.

- ``ingest``: where a RECORD_STOP becomes a stored row (``register_source``,
  ``store_recording``, ``ingest_file``)
- ``playback``: open, verify and decrypt one recording; where a Range request
  becomes frames (``open_recording``, ``iter_plaintext_range``, ``fetch_recording``)
- ``headers``: object headers read with one small request, cached once verified
- ``envelope``: the encryption context and the wrapped data key as the row keeps it
- ``services``: the adapters a job needs, built on first use; worker ids
- ``tenants``: a tenant is added only with a key that can wrap now
- ``upload``: an uploaded body becomes a stored row (``store_upload``), the
  daemon's order over a stream; a failed upload is discarded, never half-stored

The plaintext file itself (the descriptor walk from the recordings directory,
WAV completeness, delete after the identity check) is :mod:`fsrecrypt.plaintext`,
which knows nothing of keys, stores or the database: import its names from
there. The four re-exported here (``open_source``, ``vet_path``,
``fingerprint_of``, ``is_inside``) are what ``fsrecrypt.daemon`` still reaches
through the pipeline; they go when the daemon imports them from
``fsrecrypt.plaintext``.
"""

from fsrecrypt.pipeline.envelope import (
    ALGORITHM_NAME,
    edk_from_bytes,
    edk_to_bytes,
    encryption_context,
)
from fsrecrypt.pipeline.headers import (
    HEADER_PROBE,
    HeaderCache,
    read_object_header,
)
from fsrecrypt.pipeline.ingest import (
    StoreOutcome,
    ingest_file,
    register_source,
    store_recording,
)
from fsrecrypt.pipeline.playback import (
    IterReader,
    OpenedRecording,
    check_readable,
    checked_plaintext_size,
    fetch_recording,
    iter_plaintext,
    iter_plaintext_range,
    open_range,
    open_recording,
    unwrap_data_key,
)
from fsrecrypt.pipeline.services import Services, host_worker_prefix, worker_id
from fsrecrypt.pipeline.tenants import add_branch_key_tenant, add_tenant
from fsrecrypt.pipeline.upload import (
    UploadOutcome,
    UploadRequest,
    store_upload,
)
from fsrecrypt.plaintext import fingerprint_of, is_inside, open_source, vet_path

__all__ = [
    "ALGORITHM_NAME",
    "HEADER_PROBE",
    "HeaderCache",
    "IterReader",
    "OpenedRecording",
    "Services",
    "StoreOutcome",
    "UploadOutcome",
    "UploadRequest",
    "add_branch_key_tenant",
    "add_tenant",
    "check_readable",
    "checked_plaintext_size",
    "edk_from_bytes",
    "edk_to_bytes",
    "encryption_context",
    "fetch_recording",
    "fingerprint_of",
    "host_worker_prefix",
    "ingest_file",
    "is_inside",
    "iter_plaintext",
    "iter_plaintext_range",
    "open_range",
    "open_recording",
    "open_source",
    "read_object_header",
    "register_source",
    "store_recording",
    "store_upload",
    "unwrap_data_key",
    "vet_path",
    "worker_id",
]
