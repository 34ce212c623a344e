"""Next-token logits of a converted variant against transformers fp32 on the same tokens.

The reference is the Hugging Face folder run by transformers in float32; the variant is run by
edgecds's own runtime (llama.cpp for GGUF, onnxruntime for ONNX), so what is compared is what a
clinic would run. Both see the same token ids, evaluated in one pass, and every position's logits
are compared: the largest absolute difference (also relative to the reference's spread, since
random-weight models have small logits) and how often the top token agrees.

Build side: needs torch and transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgecds.engine import EngineSettings

# Clinical prose, long enough for a few hundred positions with any of the zoo's tokenizers.
PARITY_TEXT = (
    "A 67-year-old woman presents to the emergency department with two hours of crushing central chest pain "
    "radiating to the jaw, diaphoresis and nausea. She has hypertension, type 2 diabetes and a 40 pack-year "
    "smoking history. Blood pressure is 152/94 mmHg, heart rate 104 beats per minute, oxygen saturation 95% on "
    "room air. The ECG shows 3 mm ST elevation in leads II, III and aVF with reciprocal depression in I and aVL. "
    "High-sensitivity troponin is 1,240 ng/L. She is given aspirin 300 mg, ticagrelor 180 mg and unfractionated "
    "heparin, and the cardiac catheterisation laboratory is activated for primary percutaneous coronary "
    "intervention. Differential diagnoses considered include aortic dissection, pulmonary embolism, pericarditis "
    "and oesophageal rupture. A bedside echocardiogram shows inferior hypokinesia without a pericardial effusion, "
    "and the mediastinum is not widened on the chest radiograph. Angiography reveals a thrombotic occlusion of the "
    "proximal right coronary artery, which is stented with a drug-eluting stent and TIMI 3 flow is restored. "
    "She is started on atorvastatin 80 mg, bisoprolol 2.5 mg and ramipril 2.5 mg, and referred for cardiac "
    "rehabilitation. Discharge advice covers dual antiplatelet therapy for twelve months, smoking cessation, "
    "glycaemic control with a target HbA1c below 53 mmol/mol, and return precautions for recurrent chest pain, "
    "breathlessness, syncope or bleeding."
)


@dataclass(frozen=True)
class Parity:
    positions: int
    max_abs_diff: float
    p99_abs_diff: float  # the 99th percentile over positions of each position's largest difference:
    # a mixture of experts may route one position differently on a near tie, which the maximum shows
    max_rel_diff: float  # max_abs_diff over the reference logits' standard deviation
    top1_agreement: float  # share of positions whose most likely next token is the same
    reference_std: float


def compare_logits(reference: object, candidate: object) -> Parity:
    import numpy as np

    ref = np.asarray(reference, dtype=np.float64)
    got = np.asarray(candidate, dtype=np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"logits of shape {got.shape} cannot be compared with the reference's {ref.shape}")
    per_position = np.abs(ref - got).max(axis=-1)
    diff = float(per_position.max())
    std = float(ref.std())
    agree = float((ref.argmax(-1) == got.argmax(-1)).mean())
    return Parity(int(ref.shape[0]), diff, float(np.quantile(per_position, 0.99)), diff / std if std else float("inf"), agree, std)


def transformers_logits(folder: Path, tokens: list[int]) -> object:
    """Every position's next-token logits from transformers, float32, eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([tokens]))
    return out.logits[0].float().numpy()


def variant_logits(path: Path, max_tokens: int = 300) -> tuple[list[int], object]:
    """The parity text as the variant's own engine tokenizes it (no BOS: not every vocabulary has
    one), and every position's next-token logits; one load of the variant."""
    from edgecds.engine.factory import open_runtime

    runtime = open_runtime(path, EngineSettings(n_ctx=1024))
    try:
        tokens = runtime.tokenize(PARITY_TEXT, add_bos=False)[:max_tokens]
        runtime.reset()
        return tokens, runtime.eval_logits(tokens)
    finally:
        runtime.close()


def logit_parity(folder: Path, variant: Path, max_tokens: int = 300) -> Parity:
    tokens, logits = variant_logits(variant, max_tokens)
    return compare_logits(transformers_logits(folder, tokens), logits)
