"""The matcher that grades free-text diagnoses, and reasoning set aside before it reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecds.cases import Case, Option, load_cases
from edgecds.evaluate import grade, match_option
from edgecds.matcher import answer_line_done, answer_lines, canonical, initials, mentions, names, split_reasoning

REPLIES = Path(__file__).resolve().parent / "fixtures" / "replies"


@pytest.mark.parametrize("answer, reference, synonyms", [
    ("Acute appendicitis", "Acute appendicitis", ()),
    ("acute APPENDICITIS.", "Acute appendicitis", ()),  # case and punctuation
    ("Subarachnoid hemorrhage", "Subarachnoid haemorrhage", ()),  # British and American spelling
    ("oesophageal varices", "Esophageal varices", ()),  # spelling
    ("Gallstones", "Gallstone", ()),  # plural
    ("Achilles tendon rupture", "Rupture of the Achilles tendon", ()),  # word order and filler
    ("Crohn's disease", "Crohn disease", ()),  # possessive
    ("Henoch-Schonlein purpura", "Henoch-Schönlein purpura", ()),  # accents
    ("PE", "Pulmonary embolism", ("PE",)),  # a listed abbreviation
    ("BPPV", "Benign paroxysmal positional vertigo", ()),  # initials of a name of three words or more
    ("LEMS", "Lambert-Eaton myasthenic syndrome", ()),  # initials ending in s, read as the answer is
    ("ARDS", "Acute respiratory distress syndrome", ()),
    ("Probably a STEMI of the anterior wall", "Acute anterior ST-elevation myocardial infarction", ("STEMI",)),  # a synonym inside more
    ("Most likely diagnosis: diabetic ketoacidosis", "Diabetic ketoacidosis", ("DKA",)),
])
def test_answers_a_reader_would_accept_match(answer: str, reference: str, synonyms: tuple[str, ...]) -> None:
    assert mentions(answer, names(reference, synonyms)) > 0


@pytest.mark.parametrize("answer, reference, synonyms", [
    ("Appendicitis", "Acute appendicitis with perforation of the appendix", ()),  # too little of a long name
    ("pericarditis", "Acute pericarditis", ()),  # broader: accepted only when listed as a synonym
    ("Infarction", "Acute anterior ST-elevation myocardial infarction", ("STEMI",)),
    ("Pneumonia", "Legionnaires disease", ("Legionella pneumonia",)),  # a broader diagnosis
    ("Chronic pancreatitis", "Acute pancreatitis", ()),  # acute is not filler
    ("no", "Nephrotic syndrome", ("NS",)),  # too short to name anything
    ("", "Migraine", ()),
    ("Right lower lobe collapse", "Collapse of the left lower lobe", ()),  # the side matters
    ("Anterior non-ST-elevation myocardial infarction", "Acute anterior ST-elevation myocardial infarction", ("anterior STEMI",)),
    ("Not acute appendicitis", "Acute appendicitis", ()),  # a negation the name lacks
])
def test_answers_a_reader_would_refuse_do_not_match(answer: str, reference: str, synonyms: tuple[str, ...]) -> None:
    assert mentions(answer, names(reference, synonyms)) == 0


def test_canonical_forms_and_initials() -> None:
    assert canonical("The Rupture of the Achilles Tendons") == frozenset({"rupture", "achille", "tendon"})
    assert canonical("Paediatric tumours, centre") == canonical("pediatric tumor center")
    assert initials("Benign paroxysmal positional vertigo") == "bppv" and initials("Pulmonary embolism") == ""


def test_mcq_answers_are_matched_to_the_right_option() -> None:
    case = next(c for c in load_cases().cases if c.diagnosis == "Acute pericarditis")
    assert match_option("Pericarditis.", case) == case.answer_index  # an accepted synonym
    assert match_option("I think acute pericarditis, viral", case) == case.answer_index
    other = next(i for i, o in enumerate(case.options) if o.text == "Pulmonary embolism")
    assert match_option("pulmonary embolism", case) == other
    assert match_option("no idea", case) is None and match_option("", case) is None


def test_grading_classes_errors_as_the_studies_do() -> None:
    mcq = Case("c1", "v", "q", (Option("Acute appendicitis", "correct"), Option("Mesenteric adenitis", "plausible"),
                                Option("Otitis media", "off_topic")), 0)
    assert grade("acute appendicitis", mcq) == (True, 0, None)
    assert grade("Mesenteric adenitis", mcq) == (False, 1, "plausible")
    assert grade("otitis media", mcq) == (False, 2, "off_topic")
    assert grade("Meckel diverticulitis", mcq) == (False, None, "unmatched")
    assert grade("   ", mcq) == (False, None, "no_answer")
    open_case = Case("o1", "v", "q", (), None, reference="Diabetic ketoacidosis", accepted_answers=("DKA",))
    assert grade("DKA", open_case) == (True, None, None)
    assert grade("Hyperosmolar hyperglycaemic state", open_case) == (False, None, "unmatched")
    assert grade("", open_case) == (False, None, "no_answer")


@pytest.mark.parametrize("reply, opened", [("r1-distill.txt", ""), ("qwen3-template-opened.txt", ""),
                                           ("qwen3-template-opened.txt", "<think>"), ("gpt-oss-harmony.txt", "")])
def test_reasoning_is_removed_from_each_format(reply: str, opened: str) -> None:
    """Replies in the formats the reasoning models write (DeepSeek-R1 distills, Qwen3 with the block
    opened by its template, gpt-oss's harmony channels): only the final answer is matched."""
    answer, reasoning = split_reasoning(opened + (REPLIES / reply).read_text())
    assert answer.rstrip(".") == "Acute appendicitis"
    assert "<think>" not in answer and "<|" not in answer and "<|" not in reasoning and "think>" not in reasoning
    assert len(reasoning) > 60  # kept for review, recorded by length


def test_a_reply_whose_thinking_ran_out_has_no_answer() -> None:
    answer, reasoning = split_reasoning((REPLIES / "r1-budget-ran-out.txt").read_text())
    assert answer == "" and reasoning.startswith("The pain migrated")
    mcq = Case("c1", "v", "q", (Option("Acute appendicitis"), Option("Mesenteric adenitis")), 0)
    assert grade(answer, mcq) == (False, None, "no_answer")  # not graded on its thoughts


def test_generation_stops_after_an_answer_line_not_inside_thinking() -> None:
    assert not answer_line_done("<think>\nfirst thought\nsecond\n")
    assert not answer_line_done("<think>\nthoughts\n</think>\n\n")
    assert answer_line_done("<think>\nthoughts\n</think>\n\nAcute appendicitis\n")
    assert not answer_line_done("<|channel|>analysis<|message|>line one\nline two\n")
    assert answer_line_done("<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>final<|message|>Appendicitis\n")
    assert answer_line_done("Acute appendicitis\n") and not answer_line_done("Acute appendicitis")
    assert not answer_line_done("<think>x</think>\n**Diagnosis:**\n")  # a heading is not the answer
    assert answer_line_done("<think>x</think>\n**Diagnosis:**\nAcute appendicitis\n")
    assert answer_lines("**Diagnosis:**\n\n**Acute appendicitis**\nrationale: fever\n") == ["Acute appendicitis", "rationale: fever"]
