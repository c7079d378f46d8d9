"""The life after storage: audit trail checks, key rotation, erasure, retention, verification.

Everything here changes or proves something about recordings that are
already stored, so every operation follows the same two rules:

* Resumable and idempotent. A run killed half way leaves every row in a
  consistent state, and running it again finishes the job: each recording is
  handled in its own transactions with compare-and-set on the columns it
  changes, so a concurrent daemon, a second operator or a crashed earlier run
  can never be overwritten with stale data.
* Accountable. Every change writes a hash-chained ``recording_access_logs``
  row in the *same* transaction as the change (so the log cannot claim
  something that did not happen, or miss something that did), and every
  run writes a summary row with its outcome.

Modules: ``audit.py`` (verify the hash chains, export a tenant's rows),
``rotate.py`` (re-wrap data keys under a tenant's new key), ``rewrite.py``
(give an object a header wrapped by the new key), ``holds.py`` (legal
holds), ``erase.py`` (crypto-shredding, retention, expiry), ``verify.py``
(prove stored recordings decrypt end to end), ``common.py`` (what they
share). This is domain code: it never imports click or ``fsrecrypt.cli``
and never prints; functions return results and take callbacks (progress,
confirmation, where an export goes). The commands live in ``fsrecrypt.cli``.
"""
