"""Free-text diagnoses matched to a reference, the way a reader would, and reasoning set aside first.

`canonical(text)` reduces a diagnosis to what decides its meaning; two names match when their
canonical forms are equal as word sets, or one's word set contains the other's:
- case, accents and punctuation ignored; "Crohn's" = "Crohns" = "Crohn";
- British and American spellings made one (haemorrhage/hemorrhage, oedema/edema, tumour/tumor,
  paediatric/pediatric, -ise/-ize, centre/center);
- plurals made singular (gallstones/gallstone; irregular ones such as varices/varix are not);
- filler words dropped (a, an, the, of, with, "most likely"...; acute, left and right are kept);
- word order ignored: "rupture of the Achilles tendon" = "Achilles tendon rupture";
- an abbreviation matches when it is listed as a synonym, or is the initials of a name of three or
  more words ("BPPV" for benign paroxysmal positional vertigo).
An answer names a diagnosis when its words contain all of the name's words (an answer may say
more: "probably acute appendicitis, perforated") and no negation the name lacks ("non-ST-elevation
myocardial infarction" is not a STEMI, "not appendicitis" is not appendicitis); a broader answer ("pneumonia" for Legionnaires'
disease, "pericarditis" for acute pericarditis) names it only where the case lists it as a synonym.

`split_reasoning(text)` removes a reasoning model's thinking before matching: DeepSeek-R1 and Qwen3
style `<think>...</think>` blocks, and gpt-oss's harmony channels (only the `final` channel is the
answer). A reply whose thinking never closed (the budget ran out) has no answer.
"""

from __future__ import annotations

import re
import unicodedata

FILLER = frozenset({"a", "an", "the", "of", "with", "and", "in", "to", "due", "likely", "most", "probable", "probably", "diagnosis",
                    "is", "this", "it", "possible", "suspected"})
# British spellings and their American forms, applied to each word (order matters: longest first)
SPELLING = (("oesophag", "esophag"), ("haemat", "hemat"), ("haem", "hem"), ("aemia", "emia"), ("oedema", "edema"), ("paed", "ped"),
            ("oestr", "estr"), ("foet", "fet"), ("anaesth", "anesth"), ("orthopaed", "orthoped"), ("tumour", "tumor"),
            ("colour", "color"), ("ischaem", "ischem"), ("leukaem", "leukem"), ("coeliac", "celiac"), ("caecum", "cecum"),
            ("diarrhoea", "diarrhea"), ("gonorrhoea", "gonorrhea"), ("dyspnoea", "dyspnea"), ("apnoea", "apnea"))
# Reasoning models (R1 distills, Qwen3, gpt-oss) think for hundreds to a few thousand tokens before a
# diagnosis; 2,048 lets most finish on a vignette and costs nothing for a model that does not think.
THINK_TOKENS = 2048
NEGATIONS = frozenset({"non", "not", "no", "without", "excluded", "unlikely"})
# A single letter or two is never a diagnosis on its own (an answer "B" or "no").
MIN_ANSWER_CHARS = 3
THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)
HARMONY = re.compile(r"<\|channel\|>\s*(\w+)\s*(?:<\|constrain\|>\w+)?\s*<\|message\|>(.*?)(?=<\|end\|>|<\|return\|>|<\|start\|>|<\|channel\|>|$)",
                     re.DOTALL)


def _word(word: str) -> str:
    for british, american in SPELLING:
        if british in word:
            word = word.replace(british, american)
    if word.endswith("ise") and len(word) > 5:
        word = word[:-3] + "ize"
    if word.endswith("tre") and len(word) > 4:
        word = word[:-3] + "ter"
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ses", "xes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is", "os", "as")):
        return word[:-1]
    return word


def _words(text: str) -> list[str]:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().casefold()
    text = re.sub(r"'s\b", "", text)
    return [_word(w) for w in re.sub(r"[^a-z0-9]+", " ", text).split()]


def canonical(text: str) -> frozenset[str]:
    """The words that decide a diagnosis' meaning, spelling, plural and order aside."""
    return frozenset(w for w in _words(text) if w not in FILLER)


def initials(name: str) -> str:
    """The initials of a name of three or more words ("" otherwise), for abbreviations."""
    words = [w for w in _words(name) if w not in FILLER]
    return "".join(w[0] for w in words) if len(words) >= 3 else ""


def names(text: str, synonyms: tuple[str, ...] = ()) -> list[frozenset[str]]:
    """The canonical forms a diagnosis may be given in: its own, its synonyms', its initials."""
    forms = [canonical(n) for n in (text, *synonyms)]
    forms += [frozenset({_word(i)}) for i in (initials(text), *(initials(s) for s in synonyms)) if i]  # "ARDS" as an answer reads "ard"
    return [f for f in forms if f]


def mentions(answer: str, forms: list[frozenset[str]]) -> int:
    """How many words of the longest form `answer` names (0 when it names none). An answer that is
    exactly a form always names it (an abbreviation such as "PE"); otherwise it must hold all of the
    form's words and be at least MIN_ANSWER_CHARS long. A broader name ("pneumonia" for Legionella
    pneumonia) names nothing unless the case lists it as a synonym."""
    said = canonical(answer)
    if not said:
        return 0
    if said in forms:
        return len(said)
    if len(answer.strip()) < MIN_ANSWER_CHARS:
        return 0
    # a negation the name lacks turns the answer into another diagnosis ("non-ST-elevation", "not appendicitis")
    return max((len(f) for f in forms if f <= said and not (said & NEGATIONS) - f), default=0)


def split_reasoning(text: str) -> tuple[str, str]:
    """(answer, reasoning) of a reply; an unclosed thinking block leaves no answer."""
    if "<|channel|>" in text:
        channels = HARMONY.findall(text)
        final = [body for name, body in channels if name == "final"]
        thoughts = [body for name, body in channels if name != "final"]
        return (final[-1].strip() if final else ""), "\n".join(t.strip() for t in thoughts)
    thoughts = THINK.findall(text)
    answer = THINK.sub("", text)
    if re.search(r"<think>", answer, re.IGNORECASE):  # opened and never closed: all of it was thinking
        head, _, tail = re.split(r"(<think>)", answer, maxsplit=1, flags=re.IGNORECASE)
        return head.strip(), "\n".join([*thoughts, tail]).strip()
    if "</think>" in answer:  # templates that open the block in the prompt: only the close is generated
        before, _, after = answer.rpartition("</think>")
        return after.strip(), "\n".join([*thoughts, before]).strip()
    return answer.strip(), "\n".join(t.strip() for t in thoughts)


def still_thinking(text: str) -> bool:
    """True while a reply being generated is inside its reasoning (an open <think> block, or
    harmony channels with no final one yet)."""
    if re.search(r"<think>", text, re.IGNORECASE) and not re.search(r"</think>", text, re.IGNORECASE):
        return True
    return "<|channel|>" in text and "<|channel|>final" not in text


def answer_lines(answer: str) -> list[str]:
    """The lines of an answer that say something: not blank, not a heading such as "**Diagnosis:**"."""
    lines = [line.strip().strip("*#_ ").strip() for line in answer.splitlines()]
    return [line for line in lines if line and not line.endswith(":") and re.search(r"[A-Za-z0-9]", line)]


def answer_line_done(text: str) -> bool:
    """True once a reply, still being generated, has finished a line of answer after any thinking."""
    if still_thinking(text):
        return False
    if "<|channel|>" in text:
        after = text.rpartition("<|channel|>final")[2].split("<|message|>", 1)[-1]
    else:
        after = re.split(r"</think>", text, flags=re.IGNORECASE)[-1]
    return bool(answer_lines(after.rpartition("\n")[0])) if "\n" in after else False
