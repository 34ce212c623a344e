"""Clinical cases: the public JSONL format, MedQA- and MedMCQA-style imports, and the shipped set.

One case a line. edgecds's own format:
  {"id", "specialty", "incidence": "common"|"less_common"|"rare", "vignette", "question",
   "options": [{"text", "kind": "correct"|"plausible"|"off_topic"}], "answer_index",
   "accepted_answers", "rationale", "source", "license"}
of which only id, vignette, question, options and answer_index are required (an option may be a
plain string). An open-ended case has no options: {"id", "vignette", "question", "reference",
"accepted_answers", ...}, the reference diagnosis and its synonyms (scored with --mode generate or
topk; see edgecds.matcher). MedQA-style lines ({"question", "options": {"A": ...}, "answer_idx": "A"}) and
MedMCQA-style lines ({"question", "opa".."opd", "cop"}) are imported too. A file is untrusted:
every line is checked, every problem is reported with file, line and field, and no case is
returned unless the whole file is valid.
"""

from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgecds.errors import InvalidInputError

INCIDENCES = ("common", "less_common", "rare")
OPTION_KINDS = ("correct", "plausible", "off_topic")
SHIPPED_CASES = "cases-v1.jsonl"
SHIPPED_OPEN_CASES = "open-v1.jsonl"
SHIPPED = {"mcq": SHIPPED_CASES, "open": SHIPPED_OPEN_CASES}  # names `--cases` accepts for the shipped sets
DRIFT_TEXT = "drift-text.txt"
MAX_FILE_BYTES = 64 << 20
MAX_TEXT_CHARS = 20_000
MAX_OPTIONS = 10
MAX_ERRORS_SHOWN = 20


@dataclass(frozen=True)
class Option:
    text: str
    kind: str | None = None  # None when the file gave a plain string


@dataclass(frozen=True)
class Case:
    id: str
    vignette: str
    question: str
    options: tuple[Option, ...]  # empty for an open-ended case
    answer_index: int | None  # None for an open-ended case
    specialty: str = ""
    incidence: str | None = None
    accepted_answers: tuple[str, ...] = ()
    rationale: str = ""
    source: str = ""
    license: str = ""
    reference: str = ""  # an open-ended case's reference diagnosis

    @property
    def answer(self) -> Option:
        """A multiple-choice case's correct option."""
        if self.answer_index is None:
            raise ValueError(f"case {self.id} is open-ended: it has a reference diagnosis, no options")
        return self.options[self.answer_index]

    @property
    def is_open(self) -> bool:
        return not self.options

    @property
    def diagnosis(self) -> str:
        """The reference diagnosis: the open case's reference or the correct option's text."""
        return self.reference if self.answer_index is None else self.options[self.answer_index].text


@dataclass(frozen=True)
class CaseSet:
    name: str
    sha256: str  # of the file's bytes: results name the exact cases they were scored on
    cases: tuple[Case, ...]
    imported_from: str = "edgecds"  # or medqa, medmcqa
    notes: tuple[str, ...] = field(default_factory=tuple)


class _Problems:
    def __init__(self, path: str) -> None:
        self.path, self.items = path, []  # type: ignore[var-annotated]

    def add(self, line: int, where: str, message: str) -> None:
        self.items.append(f"{self.path}:{line}: {where}: {message}" if where else f"{self.path}:{line}: {message}")


def _text(data: dict[str, Any], key: str, line: int, problems: _Problems, required: bool = True) -> str:
    value = data.get(key)
    if value is None:
        if required:
            problems.add(line, key, "missing")
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        problems.add(line, key, "must be a non-empty string" if required else "must be a string")
        return ""
    if len(value) > MAX_TEXT_CHARS:
        problems.add(line, key, f"longer than {MAX_TEXT_CHARS} characters")
        return ""
    return value.strip()


def _edgecds_case(data: dict[str, Any], line: int, problems: _Problems) -> Case | None:
    before = len(problems.items)
    case_id = data.get("id")
    if not isinstance(case_id, str) or not case_id.strip():
        problems.add(line, "id", "missing or not a non-empty string")
        case_id = ""
    vignette = _text(data, "vignette", line, problems)
    question = _text(data, "question", line, problems, required=False)
    raw_options = data.get("options")
    options: list[Option] = []
    reference = ""
    if raw_options is None and "answer_index" not in data:  # open-ended: a reference diagnosis instead
        reference = _text(data, "reference", line, problems)
    elif not isinstance(raw_options, list) or not 2 <= len(raw_options) <= MAX_OPTIONS:
        problems.add(line, "options", f"must be a list of 2 to {MAX_OPTIONS} options")
    else:
        for i, raw in enumerate(raw_options):
            where = f"options[{i}]"
            if isinstance(raw, str) and raw.strip():
                options.append(Option(raw.strip()))
            elif isinstance(raw, dict) and isinstance(raw.get("text"), str) and raw["text"].strip():
                kind = raw.get("kind")
                if kind is not None and kind not in OPTION_KINDS:
                    problems.add(line, f"{where}.kind", f"{kind!r} is not one of {', '.join(OPTION_KINDS)}")
                options.append(Option(raw["text"].strip(), kind))
            else:
                problems.add(line, where, "must be a non-empty string or an object with a non-empty 'text'")
        texts = [o.text.casefold() for o in options]
        if len(set(texts)) != len(texts):
            problems.add(line, "options", "two options have the same text")
    answer = data.get("answer_index")
    if raw_options is None and answer is None:
        pass  # open-ended
    elif not isinstance(answer, int) or isinstance(answer, bool):
        problems.add(line, "answer_index", "missing or not an integer")
    elif options and not 0 <= answer < len(options):
        problems.add(line, "answer_index", f"{answer} is out of range for {len(options)} options")
    elif options and any(o.kind for o in options):
        correct = [i for i, o in enumerate(options) if o.kind == "correct"]
        if correct != [answer]:
            problems.add(line, "options", f"the option marked 'correct' ({correct or 'none'}) must be exactly answer_index {answer}")
    incidence = data.get("incidence")
    if incidence is not None and incidence not in INCIDENCES:
        problems.add(line, "incidence", f"{incidence!r} is not one of {', '.join(INCIDENCES)}")
    accepted = data.get("accepted_answers", [])
    if not isinstance(accepted, list) or not all(isinstance(a, str) for a in accepted):
        problems.add(line, "accepted_answers", "must be a list of strings")
        accepted = []
    extra = {k: _text(data, k, line, problems, required=False) for k in ("specialty", "rationale", "source", "license")}
    if len(problems.items) > before:
        return None
    return Case(case_id.strip(), vignette, question, tuple(options), None if answer is None else int(answer), extra["specialty"],
                incidence, tuple(a.strip() for a in accepted if a.strip()), extra["rationale"], extra["source"], extra["license"],  # type: ignore[arg-type]
                reference)


def _medqa_case(data: dict[str, Any], line: int, problems: _Problems) -> Case | None:
    raw = data.get("options")
    letter = data.get("answer_idx")
    if not isinstance(raw, dict) or not raw or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        problems.add(line, "options", "must map option letters to texts")
        return None
    letters = sorted(raw)
    if letter not in raw:
        problems.add(line, "answer_idx", f"{letter!r} is not one of the option letters {', '.join(letters)}")
        return None
    case = {"id": str(data.get("id") or f"line-{line}"), "vignette": data.get("question"), "question": "",
            "options": [raw[k] for k in letters], "answer_index": letters.index(letter)}
    return _edgecds_case(case, line, problems)


def _medmcqa_case(data: dict[str, Any], line: int, problems: _Problems, one_based: bool) -> Case | None:
    keys = [k for k in ("opa", "opb", "opc", "opd", "ope") if k in data]
    cop = data.get("cop")
    if not isinstance(cop, int) or isinstance(cop, bool):
        problems.add(line, "cop", "missing or not an integer")
        return None
    case = {"id": str(data.get("id") or f"line-{line}"), "vignette": data.get("question"), "question": "",
            "options": [data[k] for k in keys], "answer_index": cop - 1 if one_based else cop, "specialty": data.get("subject_name") or ""}
    return _edgecds_case(case, line, problems)


def _style(data: dict[str, Any]) -> str:
    if "vignette" in data or "answer_index" in data or "reference" in data:
        return "edgecds"
    if "opa" in data and "cop" in data:
        return "medmcqa"
    if "answer_idx" in data and isinstance(data.get("options"), dict):
        return "medqa"
    return "unknown"


def parse_cases(raw: bytes, name: str) -> CaseSet:
    problems = _Problems(name)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{name}: not UTF-8 text ({exc})") from None
    rows: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.add(number, "", f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        except RecursionError:
            problems.add(number, "", "nested too deeply to be a case")
            continue
        if not isinstance(data, dict):
            problems.add(number, "", "must be a JSON object")
            continue
        rows.append((number, data))
    styles = {_style(d) for _, d in rows}
    for number, data in rows:
        if _style(data) == "unknown":
            problems.add(number, "", "neither an edgecds case (vignette with options and answer_index, or with a reference diagnosis) "
                                     "nor a MedQA or MedMCQA question")
    if len(styles - {"unknown"}) > 1:
        problems.add(0, "", f"mixes case styles ({', '.join(sorted(styles - {'unknown'}))}); use one per file")
    # MedMCQA's own release numbers `cop` from 1; some copies from 0. A 0 anywhere means the latter.
    one_based = not any(d.get("cop") == 0 for _, d in rows if _style(d) == "medmcqa")
    numbered: list[tuple[int, Case]] = []  # each case with its own line, whichever lines failed before it
    for number, data in rows:
        style = _style(data)
        if style == "edgecds":
            case = _edgecds_case(data, number, problems)
        elif style == "medqa":
            case = _medqa_case(data, number, problems)
        elif style == "medmcqa":
            case = _medmcqa_case(data, number, problems, one_based)
        else:
            continue
        if case is not None:
            numbered.append((number, case))
    seen: dict[str, int] = {}
    for number, case in numbered:
        if case.id in seen:
            problems.add(number, "id", f"{case.id!r} repeats line {seen[case.id]}")
        seen.setdefault(case.id, number)
    cases = [case for _, case in numbered]
    if not rows and not problems.items:
        problems.add(0, "", "no cases")
    if problems.items:
        shown = problems.items[:MAX_ERRORS_SHOWN]
        more = len(problems.items) - len(shown)
        raise InvalidInputError(f"{name}: {len(problems.items)} problem(s); nothing was evaluated\n  " + "\n  ".join(shown)
                                + (f"\n  ... and {more} more" if more else ""))
    style = (styles - {"unknown"}).pop()
    notes = (f"MedMCQA 'cop' read as {'1' if one_based else '0'}-based",) if style == "medmcqa" else ()
    return CaseSet(name, hashlib.sha256(raw).hexdigest(), tuple(cases), style, notes)


def load_cases(path: Path | None = None) -> CaseSet:
    """A case file, or a shipped set: the multiple-choice one when `path` is None, or either by
    its name in SHIPPED ("mcq", "open") or its file name."""
    shipped = SHIPPED.get(str(path), str(path)) if path is not None else SHIPPED_CASES
    if path is None or (shipped in SHIPPED.values() and not path.exists()):
        raw = resources.files("edgecds.clinical").joinpath(shipped).read_bytes()
        return parse_cases(raw, shipped)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # /dev/zero, a FIFO: no end to read to
            raise InvalidInputError(f"{path}: not a regular file; give a JSONL case file")
        if info.st_size > MAX_FILE_BYTES:
            raise InvalidInputError(f"{path}: {info.st_size} bytes is larger than {MAX_FILE_BYTES >> 20} MiB; split the case file")
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read the case file ({exc.strerror})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise InvalidInputError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB; split the case file")
    return parse_cases(raw, str(path))


def drift_text() -> str:
    """The fixed clinical text (over 2,000 tokens) on which drift from the reference is measured."""
    return resources.files("edgecds.clinical").joinpath(DRIFT_TEXT).read_text(encoding="utf-8")


def prompt_for(case: Case) -> str:
    """The text each option is scored after: the vignette, the question, and 'Answer:'."""
    question = f"\nQuestion: {case.question}" if case.question else ""
    return f"{case.vignette}{question}\nAnswer:"
