"""The case format: the shipped set, imports, and malformed files named by file, line and field."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from edgecds.cases import INCIDENCES, load_cases, parse_cases, prompt_for
from edgecds.errors import InvalidInputError

GOOD = {"id": "c1", "vignette": "A 30-year-old with fever and a stiff neck.", "question": "Diagnosis?",
        "options": [{"text": "Meningitis", "kind": "correct"}, {"text": "Migraine", "kind": "plausible"}, {"text": "Gout", "kind": "off_topic"}],
        "answer_index": 0}


def jsonl(*rows: object) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


def test_the_shipped_set_is_complete() -> None:
    shipped = load_cases()
    cases = shipped.cases
    assert len(cases) >= 150 and shipped.imported_from == "edgecds"
    specialties = Counter(c.specialty for c in cases)
    assert len(specialties) >= 10
    for needed in ("emergency medicine", "radiology", "ophthalmology", "paediatrics", "obstetrics"):
        assert specialties[needed] >= 6, needed
    assert set(Counter(c.incidence for c in cases)) == set(INCIDENCES)
    for c in cases:
        assert 4 <= len(c.options) <= 5 and c.answer.kind == "correct", c.id
        assert all(o.kind in ("plausible", "off_topic") for i, o in enumerate(c.options) if i != c.answer_index), c.id
        assert c.rationale and c.license == "CC0-1.0" and c.source, c.id
    # the right answer is not always in the same place
    positions = Counter(c.answer_index for c in cases)
    assert len(positions) == 5 and max(positions.values()) - min(positions.values()) <= 1


def test_minimal_cases_with_plain_string_options() -> None:
    cs = parse_cases(jsonl({"id": "m1", "vignette": "Chest pain.", "question": "Dx?", "options": ["MI", "GERD"], "answer_index": 0}), "mine.jsonl")
    case = cs.cases[0]
    assert case.answer.text == "MI" and case.answer.kind is None and case.incidence is None
    assert prompt_for(case) == "Chest pain.\nQuestion: Dx?\nAnswer:"


def test_medqa_and_medmcqa_styles_import() -> None:
    medqa = {"question": "A 5-year-old has a barking cough. Diagnosis?", "options": {"A": "Croup", "B": "Asthma", "C": "Epiglottitis", "D": "Otitis"},
             "answer_idx": "A", "answer": "Croup"}
    cs = parse_cases(jsonl(medqa, dict(medqa, answer_idx="C")), "medqa.jsonl")
    assert cs.imported_from == "medqa" and [c.answer.text for c in cs.cases] == ["Croup", "Epiglottitis"]
    assert [c.id for c in cs.cases] == ["line-1", "line-2"]
    mcqa = {"id": "q1", "question": "Drug of choice for absence seizures?", "opa": "Ethosuximide", "opb": "Phenytoin", "opc": "Carbamazepine",
            "opd": "Gabapentin", "cop": 1, "subject_name": "Pharmacology"}
    one_based = parse_cases(jsonl(mcqa), "mcqa.jsonl")
    assert one_based.cases[0].answer.text == "Ethosuximide" and one_based.cases[0].specialty == "Pharmacology"
    zero_based = parse_cases(jsonl(dict(mcqa, cop=0), dict(mcqa, id="q2", cop=2)), "mcqa0.jsonl")
    assert [c.answer.text for c in zero_based.cases] == ["Ethosuximide", "Carbamazepine"]
    assert "0-based" in zero_based.notes[0]


@pytest.mark.parametrize("row, where", [
    ("{not json", ":1: not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, ":1: nested too deeply"),  # was a RecursionError traceback
    (dict(GOOD, answer_index=3), ":1: answer_index: 3 is out of range for 3 options"),
    (dict(GOOD, answer_index="0"), ":1: answer_index: missing or not an integer"),
    ({k: v for k, v in GOOD.items() if k != "vignette"}, ":1: vignette: missing"),
    (dict(GOOD, options=["only one"]), ":1: options: must be a list of 2 to 10 options"),
    (dict(GOOD, options=[{"text": "A", "kind": "correct"}, {"text": "B", "kind": "maybe"}]), ":1: options[1].kind: 'maybe' is not one of"),
    (dict(GOOD, answer_index=1), ":1: options: the option marked 'correct' ([0]) must be exactly answer_index 1"),
    (dict(GOOD, incidence="often"), ":1: incidence: 'often' is not one of common, less_common, rare"),
    (dict(GOOD, options=["Same", "same"]), ":1: options: two options have the same text"),
    (dict(GOOD, vignette="x" * 20_001), ":1: vignette: longer than 20000 characters"),
    ({"title": "not a case"}, ":1: neither an edgecds case"),
])
def test_malformed_lines_are_named(tmp_path: Path, row: object, where: str) -> None:
    path = tmp_path / "cases.jsonl"
    path.write_bytes(jsonl(GOOD | {"id": "ok"}, row) if not isinstance(row, str) else jsonl(row, GOOD))
    with pytest.raises(InvalidInputError) as err:
        load_cases(path)
    message = str(err.value).replace(":2:", ":1:") if not isinstance(row, str) else str(err.value)
    assert f"{path}{where}" in message and "nothing was evaluated" in message


def test_every_problem_is_reported_and_duplicates_too(tmp_path: Path) -> None:
    path = tmp_path / "cases.jsonl"
    path.write_bytes(jsonl(GOOD, GOOD, dict(GOOD, id="c3", answer_index=9), "[1, 2]"))
    with pytest.raises(InvalidInputError) as err:
        load_cases(path)
    text = str(err.value)
    assert "3 problem(s)" in text
    assert f"{path}:2: id: 'c1' repeats line 1" in text and f"{path}:3: answer_index" in text and f"{path}:4: must be a JSON object" in text


def test_a_duplicate_is_named_at_its_own_line_after_a_failed_line(tmp_path: Path) -> None:
    """A line that is JSON but not a case (line 2) once shifted every later line number by one."""
    path = tmp_path / "cases.jsonl"
    path.write_bytes(jsonl(GOOD, dict(GOOD, id="c2", options=[]), dict(GOOD, id="c3"), dict(GOOD, id="c3")))
    with pytest.raises(InvalidInputError) as err:
        load_cases(path)
    assert f"{path}:4: id: 'c3' repeats line 3" in str(err.value)


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "folder"])
def test_a_case_file_that_never_ends_or_is_not_a_file_is_refused(tmp_path: Path, special: str) -> None:
    import os

    path = Path(special) if special.startswith("/") else tmp_path / "cases"
    if special == "fifo":
        os.mkfifo(path)  # reading it would block forever
    elif special == "folder":
        path.mkdir()
    with pytest.raises(InvalidInputError, match="not a regular file"):
        load_cases(path)


def test_not_utf8_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not UTF-8"):
        parse_cases(b"\xff\xfe\x00", "bad.jsonl")
    with pytest.raises(InvalidInputError, match="no cases"):
        parse_cases(b"\n\n", "empty.jsonl")


def test_the_shipped_open_ended_set_is_complete() -> None:
    opened = load_cases(Path("open"))
    mcq = load_cases()
    assert opened.name == "open-v1.jsonl" and len(opened.cases) >= 60 and all(c.is_open for c in opened.cases)
    assert all(c.reference and c.vignette and c.question and c.options == () and c.answer_index is None for c in opened.cases)
    assert all(c.license == "CC0-1.0" for c in opened.cases)
    assert set(Counter(c.specialty for c in opened.cases)) == set(Counter(c.specialty for c in mcq.cases))  # every specialty
    assert set(Counter(c.incidence for c in opened.cases)) == set(INCIDENCES)
    # synonyms are not the reference again, and no vignette names its own diagnosis
    for c in opened.cases:
        assert all(a.casefold() != c.reference.casefold() for a in c.accepted_answers), c.id
        assert c.reference.casefold() not in c.vignette.casefold(), c.id


def test_open_ended_cases_load_and_their_mistakes_are_named(tmp_path: Path) -> None:
    good = {"id": "o1", "vignette": "A 30-year-old has pain.", "question": "Diagnosis?", "reference": "Renal colic",
            "accepted_answers": ["ureteric colic"], "specialty": "nephrology", "incidence": "common"}
    case = parse_cases(jsonl(good), "open.jsonl").cases[0]
    assert case.is_open and case.diagnosis == "Renal colic" and case.accepted_answers == ("ureteric colic",)
    mixed = parse_cases(jsonl(good, {"id": "m1", "vignette": "v", "question": "q", "options": ["A", "B"], "answer_index": 1}), "mixed.jsonl")
    assert [c.is_open for c in mixed.cases] == [True, False]  # options stay optional per case
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl(good, {**good, "id": "o2", "reference": ""}, {**good, "id": "o3", "reference": 7},
                          {k: v for k, v in good.items() if k != "reference"} | {"id": "o4"}))
    with pytest.raises(InvalidInputError) as err:
        load_cases(bad)
    message = str(err.value)
    assert f"{bad}:2: reference: must be a non-empty string" in message
    assert f"{bad}:3: reference: must be a non-empty string" in message
    assert f"{bad}:4: reference: missing" in message and ":1:" not in message
