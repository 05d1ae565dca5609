"""Tables of provider credentials (:mod:`broker.credentials`): the journal of the provider keys
the broker creates, and what it last learnt about each provider."""

from __future__ import annotations

from sqlalchemy import BigInteger, Index
from sqlmodel import Field, SQLModel


class ProviderKey(SQLModel, table=True):
    """One provider key the broker created (or inherited from an operator) and must delete.

    A row is written BEFORE the key is created, with the name it will have at the provider, so
    that a key whose creation answer was lost, or whose process died, is found again by name
    and deleted: no key the broker made is ever left behind. Never holds key material."""

    __tablename__ = "provider_key"
    __table_args__ = (Index("ix_provider_key_provider_state", "provider", "state"),)

    id: str = Field(primary_key=True, max_length=40)
    provider: str = Field(max_length=64)
    name: str = Field(max_length=128)  # the key's name at the provider
    # creating -> created -> serving -> retiring -> deleted; or creating/created -> discarded
    # (a rotation that failed, its key deleted again) or failed (no key was made); an
    # operator's first key without an id ends as abandoned (a person deletes it).
    state: str = Field(max_length=16)
    key_id: str | None = Field(default=None, max_length=128)
    account_id: str | None = Field(default=None, max_length=128)
    version: int | None = Field(default=None, sa_type=BigInteger)  # its KV v2 version
    actor: str = Field(max_length=64)
    created_at: int = Field(sa_type=BigInteger)
    updated_at: int = Field(sa_type=BigInteger)
    retire_at: int | None = Field(default=None, sa_type=BigInteger)
    attempts: int = Field(default=0, sa_type=BigInteger)  # failed deletions so far
    error: str | None = Field(default=None, max_length=256)


class ProviderStatus(SQLModel, table=True):
    """What the broker last learnt about a provider's credential: its last rotation, the
    provider-side status of its key (watched providers), its project spend limit."""

    __tablename__ = "provider_status"

    provider: str = Field(primary_key=True, max_length=64)
    rotated_at: int | None = Field(default=None, sa_type=BigInteger)
    rotation_result: str | None = Field(default=None, max_length=16)  # ok | failed
    rotation_error: str | None = Field(default=None, max_length=256)
    rotation_actor: str | None = Field(default=None, max_length=64)
    key_status: str | None = Field(default=None, max_length=16)
    key_expires_at: int | None = Field(default=None, sa_type=BigInteger)
    key_checked_at: int | None = Field(default=None, sa_type=BigInteger)
    watch_error: str | None = Field(default=None, max_length=256)
    spend_limit_micros: int | None = Field(default=None, sa_type=BigInteger)
    spend_limit_checked_at: int | None = Field(default=None, sa_type=BigInteger)
    spend_limit_error: str | None = Field(default=None, max_length=256)
    # The condition last alerted on (e.g. ``expiring:<key id>``), so a condition that lasts
    # raises one alert, not one per check.
    alerted: str | None = Field(default=None, max_length=160)
    updated_at: int = Field(sa_type=BigInteger)
