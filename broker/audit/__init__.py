"""The audit chain's checkpoints (signed with the audit key held in Vault) and its
verification. Entries themselves are appended by :mod:`broker.storage.audit`."""
