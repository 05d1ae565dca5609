"""Names of tenants and workloads (API.md: "Names ... are stored NFKC-normalised; a name equal
after normalisation to another in the same scope is 409; anything else is 422").

First the rules of :func:`broker.identity.names.normalize_name` and :func:`broker.identity.names.name_key`
as a
table of named cases, then the same rules through the admin API on SQLite and PostgreSQL.
Look-alike characters are written as escapes so that the table shows what it tests.
"""

from __future__ import annotations

import random
import secrets
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from broker.identity.names import name_key, normalize_name
from broker.storage.db import _alembic_config, make_engine
from tests.conftest import PG_ADMIN_URL, Broker, _pg_admin
from tests.support import assert_problem

PROBLEM = "application/problem+json"

CAFE_NFC = "caf\u00e9"
CAFE_NFD = "cafe\u0301"
CAFE_FULLWIDTH = "\uff43\uff41\uff46\u00e9"
CAFE_CYRILLIC = "\u0441\u0430f\u00e9"  # Cyrillic es and a, Latin f and e-acute

ACCEPTED = [
    # (given, stored)
    pytest.param(CAFE_NFC, CAFE_NFC, id="nfc-cafe"),
    pytest.param(CAFE_NFD, CAFE_NFC, id="nfd-cafe-composed"),
    pytest.param(CAFE_FULLWIDTH, CAFE_NFC, id="fullwidth-to-ascii"),
    pytest.param("caf\u00e9 ", CAFE_NFC, id="trailing-space-trimmed"),
    pytest.param(" caf\u00e9", CAFE_NFC, id="leading-space-trimmed"),
    pytest.param("team  one", "team one", id="double-space-collapsed"),
    pytest.param("a \u3000\u00a0 b", "a b", id="unicode-spaces-collapsed"),
    pytest.param("team-1.prod_eu", "team-1.prod_eu", id="ascii-digits-dashes-underscores-dots"),
    pytest.param("Z\u00fcrich", "Z\u00fcrich", id="zurich"),
    pytest.param("Zu\u0308rich", "Z\u00fcrich", id="zurich-decomposed"),
    pytest.param("\u6771\u4eac\u30c1\u30fc\u30e0", "\u6771\u4eac\u30c1\u30fc\u30e0",
                 id="japanese-han-katakana"),
    pytest.param("\u30c1\uff70\u30e0", "\u30c1\u30fc\u30e0", id="halfwidth-prolonged-mark"),
    pytest.param("\u4f50\u3005\u6728", "\u4f50\u3005\u6728", id="japanese-iteration-mark"),
    pytest.param("\u3072\u3089\u304c\u306a \u30ab\u30bf\u30ab\u30ca \u6f22\u5b57 abc",
                 "\u3072\u3089\u304c\u306a \u30ab\u30bf\u30ab\u30ca \u6f22\u5b57 abc",
                 id="japanese-with-latin"),
    pytest.param("\u4e2d\u6587 \u3105\u3106 abc", "\u4e2d\u6587 \u3105\u3106 abc",
                 id="chinese-han-bopomofo-latin"),
    pytest.param("\uc11c\uc6b8 \ud300", "\uc11c\uc6b8 \ud300", id="korean"),
    pytest.param("\ud55c\uad6d \u6f22\u5b57 abc", "\ud55c\uad6d \u6f22\u5b57 abc",
                 id="korean-hangul-han-latin"),
    pytest.param("\u041c\u043e\u0441\u043a\u0432\u0430", "\u041c\u043e\u0441\u043a\u0432\u0430",
                 id="cyrillic-moscow"),
    pytest.param("\u0395\u03bb\u03bb\u03ac\u03b4\u03b1", "\u0395\u03bb\u03bb\u03ac\u03b4\u03b1",
                 id="greek"),
    pytest.param("\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
                 "\u0627\u0644\u0639\u0631\u0628\u064a\u0629", id="arabic"),
    pytest.param("\u0641\u0627\u0631\u0633\u06cc \u06f1\u06f2", "\u0641\u0627\u0631\u0633\u06cc \u06f1\u06f2",
                 id="persian-with-its-digits"),
    pytest.param("\u0939\u093f\u0928\u094d\u0926\u0940", "\u0939\u093f\u0928\u094d\u0926\u0940",
                 id="devanagari-with-marks"),
    pytest.param("team-1 (prod)", "team-1 (prod)", id="punctuation"),
    pytest.param("a\u0301\u0302", "\u00e1\u0302", id="two-marks-in-a-row"),
    pytest.param("x" * 128, "x" * 128, id="128-chars"),
    pytest.param("  " + "x" * 128 + "  ", "x" * 128, id="128-chars-after-trimming"),
    pytest.param("\u2167", "VIII", id="roman-numeral-compatibility"),
]

REFUSED = [
    # (given, part of the message)
    pytest.param(CAFE_CYRILLIC, "scripts", id="cyrillic-look-alike"),
    pytest.param("pr\u03bfd", "scripts", id="greek-omicron-in-latin"),
    pytest.param("team-\u09ea", "scripts", id="bengali-digit-in-latin"),
    pytest.param("\u3072\u3089\ud55c\uad6d", "scripts", id="kana-with-hangul"),
    pytest.param("\u0645\u0631\u062d\u0628\u0627 hi", "scripts", id="arabic-with-latin"),
    pytest.param("\u02bcadmin", "scripts", id="modifier-letter-apostrophe-with-latin"),
    pytest.param("a\tb", "control", id="tab"),
    pytest.param("a\nb", "control", id="newline"),
    pytest.param("a\x00b", "control", id="nul"),
    pytest.param("a\x85b", "control", id="next-line-c1"),
    pytest.param("a\u2028b", "control", id="line-separator"),
    pytest.param("a\u2029b", "control", id="paragraph-separator"),
    pytest.param("a\u200bb", "control", id="zero-width-space"),
    pytest.param("a\u200db", "control", id="zero-width-joiner"),
    pytest.param("a\u00adb", "control", id="soft-hyphen"),
    pytest.param("\ufeffab", "control", id="byte-order-mark"),
    pytest.param("a\ud800b", "control", id="lone-surrogate"),
    pytest.param("a\ue000b", "private-use", id="private-use"),
    pytest.param("a\U000f0000b", "private-use", id="private-use-plane-15"),
    pytest.param("a\U000e0041b", "control", id="tag-character"),
    pytest.param("a\u0378b", "unassigned", id="unassigned"),
    pytest.param("admin\u3164", "invisible", id="hangul-filler"),
    pytest.param("admin\ufe0f", "invisible", id="variation-selector"),
    pytest.param("admin\u2800", "invisible", id="braille-blank"),
    pytest.param("evil\u202egpj.exe", "bidirectional", id="rlo-override"),
    pytest.param("a\u2066b\u2069", "bidirectional", id="bidi-isolate"),
    pytest.param("", "empty", id="empty"),
    pytest.param("   ", "whitespace", id="whitespace-only"),
    pytest.param("\u3000\u00a0\u2003", "whitespace", id="unicode-whitespace-only"),
    pytest.param("e" + "\u0301" * 10, "combining", id="ten-combining-marks"),
    pytest.param("q\u0301\u0302\u0303", "combining", id="three-combining-marks"),
    pytest.param("x" * 129, "128", id="129-chars"),
    pytest.param("\ufdfa" * 8, "128", id="too-long-after-nfkc"),
    pytest.param("x" * 100_000, "128", id="huge"),
]


@pytest.mark.parametrize(("given", "stored"), ACCEPTED)
def test_accepted_names_are_stored_normalised(given: str, stored: str) -> None:
    assert normalize_name(given) == stored
    assert normalize_name(stored) == stored  # stored names pass unchanged
    assert unicodedata.is_normalized("NFKC", stored)


@pytest.mark.parametrize(("given", "message"), REFUSED)
def test_refused_names_say_why(given: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalize_name(given)


@pytest.mark.parametrize(("a", "b"), [
    pytest.param("Prod", "prod", id="case"),
    pytest.param("CAF\u00c9", CAFE_NFC, id="accented-case"),
    pytest.param("Stra\u00dfe", "STRASSE", id="sharp-s"),
    pytest.param("\u0395\u039b\u039b\u0391\u0394\u0391", "\u03b5\u03bb\u03bb\u03b1\u03b4\u03b1",
                 id="greek-case"),
    pytest.param(CAFE_FULLWIDTH.upper(), CAFE_NFD, id="fullwidth-upper-vs-nfd"),
])
def test_the_key_ignores_case_and_form(a: str, b: str) -> None:
    assert name_key(normalize_name(a)) == name_key(normalize_name(b))


def test_the_key_is_normalised_and_fits_its_column() -> None:
    key = name_key(normalize_name("\u0130" * 128))  # dotted capital I folds to i + a mark
    assert unicodedata.is_normalized("NFKC", key) and len(key) <= 256
    assert name_key(normalize_name("\u00df" * 128)) == "ss" * 128
    assert name_key("a") != name_key("b")


def test_normalising_is_idempotent_on_random_text() -> None:
    """Whatever is accepted is NFKC, trimmed, at most 128 characters and accepted unchanged."""
    alphabet = ("aAzZ09-_. \t\u00e9\u0301\u0308\u0327\u3000\u00a0\uff41\u0430\u03bf\u6771\u30c1"
                "\u30fc\uac00\u3105\u0130\u00df\u200b\u202e\ufdfa\u1680\u0e49\u0e33")
    rng = random.Random(1234)
    accepted = 0
    for _ in range(5000):
        given = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        try:
            stored = normalize_name(given)
        except ValueError:
            continue
        accepted += 1
        assert normalize_name(stored) == stored, repr(given)
        assert unicodedata.is_normalized("NFKC", stored), repr(given)
        assert stored == stored.strip() and "  " not in stored and 1 <= len(stored) <= 128
        assert name_key(name_key(stored)) == name_key(stored)
    assert accepted > 100


# --- through the admin API, on both backends ---------------------------------------------------



def post_tenant(broker: Broker, name: str) -> Any:
    return broker.client.post("/v1/admin/tenants", json={"name": name}, headers=broker.admin())


def post_workload(broker: Broker, tenant_id: str, name: str) -> Any:
    return broker.client.post("/v1/admin/workloads", headers=broker.admin(),
                              json={"tenant_id": tenant_id, "name": name, "kind": "agent"})


def test_tenant_names_are_unique_after_normalisation(broker: Broker) -> None:
    tenant = broker.create_tenant(CAFE_NFC)
    assert tenant["name"] == CAFE_NFC
    for same in (CAFE_NFD, CAFE_FULLWIDTH, CAFE_NFC + " ", " " + CAFE_NFC, "CAF\u00c9", "Caf\u00e9"):
        assert "exists" in assert_problem(post_tenant(broker, same), 409)["detail"]
    for bad in (CAFE_CYRILLIC, "   ", "caf\u00e9\u200b", "caf\u00e9\u202e", "e" + "\u0301" * 10):
        assert "name" in assert_problem(post_tenant(broker, bad), 422)["detail"]
    # The bootstrap admin's tenant holds its key like any other.
    assert_problem(post_tenant(broker, "ROOT"), 409)
    listed = broker.client.get("/v1/admin/tenants", headers=broker.admin()).json()
    assert [t["name"] for t in listed["data"]].count(CAFE_NFC) == 1


def test_a_decomposed_name_is_stored_composed(broker: Broker) -> None:
    tenant = broker.create_tenant(" " + CAFE_NFD + "  noir ")
    assert tenant["name"] == CAFE_NFC + " noir"
    got = broker.client.get(f"/v1/admin/tenants/{tenant['id']}", headers=broker.admin()).json()
    assert got["name"] == CAFE_NFC + " noir"
    assert_problem(post_tenant(broker, CAFE_NFC + " NOIR"), 409)
    workload = broker.create_workload(tenant["id"], name=CAFE_FULLWIDTH)
    assert workload["name"] == CAFE_NFC


def test_renaming_to_a_name_taken_after_normalisation_is_409(broker: Broker) -> None:
    c, h = broker.client, broker.admin()
    broker.create_tenant(CAFE_NFC)
    other = broker.create_tenant("other")
    url = f"/v1/admin/tenants/{other['id']}"
    assert_problem(c.patch(url, json={"name": CAFE_NFD}, headers=h), 409)
    assert_problem(c.patch(url, json={"name": CAFE_FULLWIDTH.upper()}, headers=h), 409)
    assert_problem(c.patch(url, json={"name": CAFE_CYRILLIC}, headers=h), 422)
    assert_problem(c.patch(url, json={"name": " \t "}, headers=h), 422)
    assert c.get(url, headers=h).json()["name"] == "other"
    # A tenant may change the case of its own name: the key is its own.
    resp = c.patch(url, json={"name": "OTHER"}, headers=h)
    assert resp.status_code == 200 and resp.json()["name"] == "OTHER"


def test_workload_names_are_unique_per_tenant_after_normalisation(broker: Broker) -> None:
    c, h = broker.client, broker.admin()
    a, b = broker.create_tenant(), broker.create_tenant()
    bot = broker.create_workload(a["id"], name="Bot")
    for same in ("bot", "BOT ", "\uff42\uff4f\uff54", "bot\u3000"):
        assert "exists" in assert_problem(post_workload(broker, a["id"], same), 409)["detail"]
    assert_problem(post_workload(broker, a["id"], "b\u043et"), 422)  # Cyrillic o
    assert_problem(post_workload(broker, a["id"], "\u00a0"), 422)
    # Another tenant may use the name, in any form.
    in_b = broker.create_workload(b["id"], name="bot")
    broker.create_workload(b["id"], name=CAFE_NFD)
    assert_problem(post_workload(broker, b["id"], CAFE_NFC), 409)
    # Renaming: into a name taken in the same tenant is 409, not in another tenant's.
    helper = broker.create_workload(a["id"], name="helper")
    url = f"/v1/admin/workloads/{helper['id']}"
    assert_problem(c.patch(url, json={"name": "BOT"}, headers=h), 409)
    assert_problem(c.patch(url, json={"name": "bo\u0442"}, headers=h), 422)
    resp = c.patch(url, json={"name": "Caf\u00e9"}, headers=h)
    assert resp.status_code == 200 and resp.json()["name"] == "Caf\u00e9"
    resp = c.patch(f"/v1/admin/workloads/{in_b['id']}", json={"name": "\uff22\uff2f\uff34"},
                   headers=h)
    assert resp.status_code == 200 and resp.json()["name"] == "BOT"
    assert c.get(f"/v1/admin/workloads/{bot['id']}", headers=h).json()["name"] == "Bot"


# --- the migration that added the keys -------------------------------------------------------


def _name_keys(conn: sa.Connection, table: str) -> dict[str, str]:
    """Each row's id and stored ``name_key``."""
    rows = conn.execute(sa.text(f"SELECT id, name_key FROM {table}"))
    return {str(row[0]): str(row[1]) for row in rows}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/old.db"
        return
    name = f"broker_nk_{secrets.token_hex(4)}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_upgrade_keys_existing_names_and_never_fails(empty_db: str) -> None:
    """Names the old rules let collide get distinct keys (the oldest keeps the plain one), names
    today's rules refuse are keyed case-folded, workloads survive the rebuilt tenant table, and
    the downgrade brings the old constraints back."""
    engine = make_engine(empty_db)
    cfg = _alembic_config(empty_db)

    def alembic(step: Callable[[Any, str], None], revision: str) -> None:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            step(cfg, revision)

    tenants = {"tn_a": CAFE_NFC, "tn_b": CAFE_NFD, "tn_c": "CAF\u00c9 ", "tn_d": "evil\u202egpj",
               "tn_e": "\u00df" * 128, "tn_f": "caf\u00e9~tn_c"}
    insert_tenant = sa.text("INSERT INTO tenant (id, name, budgets, created_at) "
                            "VALUES (:id, :name, '[]', :at)")
    insert_workload = sa.text(
        "INSERT INTO workload (id, tenant_id, name, kind, roles, policy, client_id, secret_hash,"
        " created_at) VALUES (:id, :tenant, :name, 'agent', '[]', '{}', :id, 'h', :at)")
    try:
        alembic(command.upgrade, "0002")
        with engine.begin() as conn:
            for at, (tid, name) in enumerate(tenants.items()):
                conn.execute(insert_tenant, {"id": tid, "name": name, "at": at})
            for at, (wid, tid, name) in enumerate([("wl_1", "tn_a", "Bot"), ("wl_2", "tn_a", "bot"),
                                                   ("wl_3", "tn_b", "bot")]):
                conn.execute(insert_workload, {"id": wid, "tenant": tid, "name": name, "at": at})
        alembic(command.upgrade, "head")
        with engine.connect() as conn:
            keys = _name_keys(conn, "tenant")
            wkeys = _name_keys(conn, "workload")
        # tn_c's suffixed key would be tn_f's own key: it gets a second suffix.
        assert keys == {"tn_a": CAFE_NFC, "tn_b": CAFE_NFC + "~tn_b", "tn_c": CAFE_NFC + "~tn_c~1",
                        "tn_d": "evil\u202egpj", "tn_e": "ss" * 128, "tn_f": CAFE_NFC + "~tn_c"}
        assert wkeys == {"wl_1": "bot", "wl_2": "bot~wl_2", "wl_3": "bot"}
        alembic(command.downgrade, "0002")
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM workload")).scalar_one() == 3
            assert "name_key" not in {c["name"] for c in sa.inspect(conn).get_columns("tenant")}
        alembic(command.upgrade, "head")
        with engine.connect() as conn:
            again = _name_keys(conn, "tenant")
        assert again == keys
    finally:
        engine.dispose()
