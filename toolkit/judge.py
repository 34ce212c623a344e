"""A local judge: a model edgecds can run grades free-text answers against the reference.

The judge reads a fixed rubric in its own chat template and is asked for one word; its grade is
whichever of " yes" and " no" its own logits make more likely after the prompt, so a tiny judge
still grades deterministically and a 20B judge on a clinic's GPU grades with the same command.
The judge's identity (file and sha256) and the rubric's sha256 are recorded with the grades, and
its agreement with the matcher is Cohen's kappa with a 95% interval on the cases both graded.
On the tiny models of this project's tests the judge is poor; the kappa says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecds.digest import cache_key, sha256_file, sha256_folder
from edgecds.engine import EngineSettings, Runtime
from edgecds.engine.factory import open_runtime
from edgecds.stats import cohen_kappa

RUBRIC = (
    "You are grading a clinical diagnosis answer against a reference.\n"
    "Reference diagnosis: {reference}\n"
    "Accepted synonyms: {synonyms}\n"
    "Candidate answer: {answer}\n"
    "Does the candidate answer name the reference diagnosis? A synonym or an abbreviation counts; a broader, narrower "
    "or different diagnosis does not.{listed} Reply with one word, yes or no."
)
LISTED = " The candidate may list several diagnoses: yes if any of them is the reference."


@dataclass(frozen=True)
class Judge:
    path: Path
    sha256: str
    runtime: Runtime

    @classmethod
    def open(cls, path: Path, settings: EngineSettings) -> Judge:
        return cls(path, variant_identity(path)["sha256"], open_runtime(path, settings))

    def identity(self, mode: str) -> dict[str, Any]:
        return {"variant": self.path.name, "sha256": self.sha256, "rubric_sha256": cache_key(rubric(mode), length=64),
                "method": "log-probability of ' yes' against ' no' after the rubric, in the judge's chat template"}

    def grade(self, reference: str, synonyms: tuple[str, ...], answer: str, mode: str) -> bool:
        import numpy as np

        prompt = self.runtime.chat_prompt(rubric(mode).format(reference=reference, synonyms=", ".join(synonyms) or "none", answer=answer))
        self.runtime.reset()
        self.runtime.eval(self.runtime.tokenize(prompt))
        logits = np.asarray(self.runtime.logits(), dtype=np.float64)

        def best(word: str) -> float:  # the word's first token, in any casing and spacing the reply may start with
            forms = {word, word.capitalize(), " " + word, " " + word.capitalize()}
            return max(float(logits[self.runtime.tokenize(f, add_bos=False)[0]]) for f in forms)

        return best("yes") > best("no")

    def close(self) -> None:
        self.runtime.close()


def variant_identity(path: Path) -> dict[str, str]:
    """A judge as results name it: its file or folder name and its sha256."""
    return {"variant": path.name, "sha256": sha256_folder(path) if path.is_dir() else sha256_file(path)}


def rubric(mode: str) -> str:
    return RUBRIC.replace("{listed}", LISTED if mode == "topk" else "")


def agreement(matcher: list[bool], judge: list[bool]) -> dict[str, Any]:
    """The judge against the matcher on the same answers: Cohen's kappa with its 95% interval."""
    kappa, low, high = cohen_kappa(matcher, judge)
    n = len(matcher)
    agree = sum(a == b for a, b in zip(matcher, judge, strict=True))
    return {"n": n, "agreement": round(agree / n, 4) if n else 0.0, "kappa": round(kappa, 4), "low": round(low, 4), "high": round(high, 4),
            "judge_correct": sum(judge), "matcher_correct": sum(matcher)}
