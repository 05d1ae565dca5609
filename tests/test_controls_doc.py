"""docs/controls.md stays true: every test it names exists, and every control it maps has a
section naming a NIST CSF 2.0 function and category, an OWASP agentic item, a MAESTRO layer and
a test.

A reference is a backticked ``tests/<file>.py`` (a test file) or ``tests/<file>.py::<name>`` (a
function ``name`` defined at module level or in a class of that file, found by parsing the file,
never by searching its text). These tests read files only: no fixture, no service.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "controls.md"

# The controls the document must map, each under a heading of exactly this name.
REQUIRED = ("Identity binding", "Quota-bound tokens", "Caps", "Approvals", "Detectors",
            "Revocation", "Rotation", "Audit")

TEST_REF = re.compile(r"`(tests/[A-Za-z0-9_/]+\.py)(?:::([A-Za-z_][A-Za-z0-9_]*))?`")
ANY_TESTS_PATH = re.compile(r"`tests/[^`]*`")
CSF_FUNCTION = re.compile(r"\b(?:Govern|Identify|Protect|Detect|Respond|Recover)\b")
CSF_ID = re.compile(r"\b(GV|ID|PR|DE|RS|RC)\.([A-Z]{2})(?:-\d{2})?\b")
ASI_ID = re.compile(r"\bASI(\d{2})\b")
THREAT_ID = re.compile(r"\bT(\d{1,2})\b")
MAESTRO_LAYER = re.compile(r"\bL(\d+)\b")
MARKDOWN_LINK = re.compile(r"\[([^\]]*)\]\(([^)]*)\)")

# The 22 categories of NIST CSF 2.0, by function.
CSF_CATEGORIES = {
    "GV": {"OC", "RM", "RR", "PO", "OV", "SC"},
    "ID": {"AM", "RA", "IM"},
    "PR": {"AA", "AT", "DS", "PS", "IR"},
    "DE": {"CM", "AE"},
    "RS": {"MA", "AN", "CO", "MI"},
    "RC": {"RP", "CO"},
}


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _sections(text: str) -> dict[str, str]:
    """Each ``## `` section's body (its ``###`` subsections included), by heading."""
    found: dict[str, str] = {}
    title: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("## "):
            if title is not None:
                found[title] = "\n".join(lines)
            title, lines = line[3:].strip(), []
        elif title is not None:
            lines.append(line)
    if title is not None:
        found[title] = "\n".join(lines)
    return found


def _refs(text: str) -> set[tuple[str, str | None]]:
    return {(path, name or None) for path, name in TEST_REF.findall(text)}


def _summary_rows(text: str) -> dict[str, str]:
    """The summary table's rows: the rest of each row, by the control in its first cell."""
    rows: dict[str, str] = {}
    for line in _sections(text).get("Summary", "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or set(cells[0]) <= {"-", ":"} or cells[0] == "control":
            continue
        rows[MARKDOWN_LINK.sub(r"\1", cells[0])] = "|".join(cells[1:])
    return rows


@cache
def _functions(path: str) -> frozenset[str]:
    """The names of the functions defined at module level or in a class (at any depth of
    classes) of the file ``path``, relative to the repository."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"), filename=path)
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(tree.body)
    return frozenset(names)


def test_every_test_the_doc_names_exists() -> None:
    text = _doc()
    malformed = [m for m in ANY_TESTS_PATH.findall(text) if not TEST_REF.fullmatch(m)]
    assert not malformed, f"not of the form `tests/<file>.py` or `tests/<file>.py::<name>`: {malformed}"
    refs = _refs(text)
    assert len(refs) >= 2 * len(REQUIRED), f"only {len(refs)} test references found"
    missing = []
    for path, name in sorted(refs, key=lambda r: (r[0], r[1] or "")):
        if not (ROOT / path).is_file():
            missing.append(f"{path}: no such file")
        elif name is not None and name not in _functions(path):
            missing.append(f"{path}::{name}: no such function in the file")
    assert not missing, "docs/controls.md names tests that do not exist:\n" + "\n".join(missing)


def test_each_control_has_a_section_naming_every_framework_and_a_test() -> None:
    text = _doc()
    sections = _sections(text)
    controls = list(_summary_rows(text))
    absent = [c for c in REQUIRED if c not in controls or c not in sections]
    assert not absent, f"controls without a summary row or a section: {absent}"
    problems = []
    for control in controls:
        body = sections.get(control)
        if body is None:
            problems.append(f"{control}: in the summary table but has no section")
            continue
        if not (CSF_FUNCTION.search(body) and CSF_ID.search(body)):
            problems.append(f"{control}: no NIST CSF 2.0 function and category")
        if not (ASI_ID.search(body) or THREAT_ID.search(body)):
            problems.append(f"{control}: no OWASP agentic item (ASI01-ASI10, T1-T15)")
        if not MAESTRO_LAYER.search(body):
            problems.append(f"{control}: no MAESTRO layer (L1-L7)")
        if not _refs(body):
            problems.append(f"{control}: no test")
    assert not problems, "\n".join(problems)


def test_the_summary_names_the_tests_of_each_section() -> None:
    text = _doc()
    sections = _sections(text)
    differ = []
    for control, row in _summary_rows(text).items():
        in_row, in_section = _refs(row), _refs(sections.get(control, ""))
        if in_row != in_section:
            differ.append(f"{control}: only in the table {sorted(in_row - in_section, key=str)}, "
                          f"only in the section {sorted(in_section - in_row, key=str)}")
    assert not differ, "\n".join(differ)


def test_framework_identifiers_exist() -> None:
    text = _doc()
    wrong = [f"{f}.{c}" for f, c in CSF_ID.findall(text) if c not in CSF_CATEGORIES[f]]
    wrong += [f"ASI{n}" for n in ASI_ID.findall(text) if not 1 <= int(n) <= 10]
    wrong += [f"T{n}" for n in THREAT_ID.findall(text) if not 1 <= int(n) <= 15]
    wrong += [f"L{n}" for n in MAESTRO_LAYER.findall(text) if not 1 <= int(n) <= 7]
    assert not wrong, f"identifiers no framework defines: {sorted(set(wrong))}"


def test_the_doc_links_nowhere_outside_the_repository() -> None:
    text = _doc()
    assert "://" not in text, "docs/ never link outside the repository"
    outside = [target for _label, target in MARKDOWN_LINK.findall(text)
               if not target.startswith("#") and (target.startswith("/") or ".." in target)]
    assert not outside, f"links out of the repository: {outside}"
