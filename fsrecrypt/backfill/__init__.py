"""``fsrecrypt backfill``: encrypt the plaintext archive that already exists.

- ``naming``: SOURCE arguments, the call UUID and tenant a name holds, the
  media type a file claims and its first bytes confirm (pure)
- ``sources``: the listing, streamed: a directory walked by descriptors
  (no symbolic link followed), or an S3 prefix (``s3source``, boto3)
- ``item``: one item, stored exactly as the daemon stores a recording, read
  back and verified, and only then its source removed
- ``job``: the ``backfill`` job kind (items created from the listing, worked
  by the command itself or by any ``fsrecrypt worker``)

Never imports click or the CLI, never prints.
"""
