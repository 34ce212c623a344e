"""The Hugging Face folder built from the default GGUF, and its F16 conversion, against each other.

Tokenization must be identical between the rebuilt HF tokenizer, llama.cpp on the converted F16
GGUF, and llama.cpp on the original GGUF. Greedy continuations of transformers (fp32) and
llama.cpp (F16) must agree on their first 16 tokens for most prompts; the count is written to
test-artifacts/parity.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgecds.formats.gguf_file import read_gguf

pytestmark = pytest.mark.slow

CLINICAL_SENTENCES = [
    "BP 142/91 mmHg, HR 118 bpm, SpO₂ 91% on room air, T 38.4 °C.",
    "Troponin I 0.8 ng/mL (ref <0.04); eGFR 38 mL/min/1.73m².",
    "Start amoxicillin 500 mg PO TID × 7 days; review in 48h.",
    "Pt c/o dyspnoea & pleuritic chest pain; Hx of DVT (2019), on OCP.",
    "Na⁺ 128 mmol/L, K⁺ 5.9 mmol/L; ECG: peaked T waves, QRS 140 ms.",
    "HbA1c 9.2% (77 mmol/mol); metformin 1 g BID, SGLT2i added.",
    "CT head: no ICH; GCS 14/15 (E4 V4 M6); pupils 3 mm, reactive.",
    "Température 38,9 °C — suspicion de méningite; ponction lombaire.",
    "Ultraschall: Gallenblasenwand 5 mm, Murphy-Zeichen positiv.",
    "症例: 発熱と咳嗽が3日間続く。",
    "  Leading spaces,\ttabs and\nnew lines  ",
    "Fever 🤒 in a 3-month-old → full septic screen (FBC, CRP, LP).",
    "<|im_start|>user\nchest pain<|im_end|>",
    "IV ceftriaxone 2g q24h; vancomycin 15–20 mg/kg q8–12h.",
]

GREEDY_PROMPTS = [
    "A 58-year-old man presents with crushing chest pain radiating to the left arm. The most likely diagnosis is",
    "The first-line treatment for uncomplicated hypertension in adults is",
    "Question: What is the most common cause of community-acquired pneumonia?\nAnswer:",
    "A child with a barking cough and inspiratory stridor most likely has",
    "Symptoms of diabetic ketoacidosis include",
    "The normal range for adult resting heart rate is",
    "Sudden painless loss of vision in one eye with a cherry-red spot suggests",
    "In anaphylaxis, the first drug to give is",
    "A pregnant woman at 34 weeks with headache, high blood pressure and protein in the urine has",
    "The Glasgow Coma Scale measures",
    "Risk factors for deep vein thrombosis include",
    "An X-ray showing a fluid level behind the stomach and free air under the diaphragm indicates",
]
GREEDY_TOKENS = 16


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("EDGECDS_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def hf_tokenizer(model_store: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_store / "models" / "smollm2-135m-instruct" / "hf")


def llama_vocab(path: Path):  # type: ignore[no-untyped-def]
    from llama_cpp import Llama

    return Llama(model_path=str(path), vocab_only=True, verbose=False)


def test_rebuilt_tokenizer_has_the_right_special_tokens(hf_folder: Path, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert hf_tokenizer.eos_token == "<|im_end|>"
    assert hf_tokenizer.bos_token == "<|im_start|>"
    assert hf_tokenizer("hello")["input_ids"] == hf_tokenizer("hello", add_special_tokens=False)["input_ids"]  # no BOS added
    spec = json.loads((hf_folder / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and spec["model"]["byte_fallback"] is False
    assert spec["decoder"]["type"] == "ByteLevel"
    config = json.loads((hf_folder / "config.json").read_text())
    assert config["eos_token_id"] == 2 and config["architectures"] == ["LlamaForCausalLM"]


def test_converter_recognised_the_bpe_pre_tokenizer(f16_gguf: Path) -> None:
    meta = read_gguf(f16_gguf).metadata
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta.get("tokenizer.ggml.add_bos_token", False) is False
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    assert meta["general.name"] == "SmolLM2-135M-Instruct"


def test_tokenization_is_identical_across_hf_converted_and_original(hf_tokenizer, f16_gguf: Path, source_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    converted, original = llama_vocab(f16_gguf), llama_vocab(source_gguf)
    for sentence in CLINICAL_SENTENCES:
        hf_ids = hf_tokenizer(sentence)["input_ids"]
        # HF tokenizers parse control tokens written in the text; llama.cpp does when special=True
        assert converted.tokenize(sentence.encode(), add_bos=False, special=True) == hf_ids, sentence
        assert original.tokenize(sentence.encode(), add_bos=False, special=True) == hf_ids, sentence
        assert hf_tokenizer.decode(hf_ids) == sentence


def test_greedy_continuations_agree_between_transformers_and_llama_cpp(hf_folder: Path, f16_gguf: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from edgecds.hwbench.load_check import load_and_generate

    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    model.eval()
    results = []
    for prompt in GREEDY_PROMPTS:
        ours = load_and_generate(f16_gguf, prompt, GREEDY_TOKENS)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ours.prompt_tokens]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                pad_token_id=2, eos_token_id=2, attention_mask=torch.ones(1, len(ours.prompt_tokens), dtype=torch.long),
            )
        theirs = [t for t in out[0, len(ours.prompt_tokens):].tolist()]
        theirs = theirs[: theirs.index(2)] if 2 in theirs else theirs
        results.append({"prompt": prompt, "llama_cpp_f16": ours.tokens, "transformers_fp32": theirs, "agree": ours.tokens == theirs})
    agreed = sum(r["agree"] for r in results)
    (artifacts_dir() / "parity.json").write_text(json.dumps({"agreed": agreed, "prompts": len(results), "tokens": GREEDY_TOKENS, "results": results}, indent=2))
    print(f"greedy agreement: {agreed}/{len(results)} prompts on the first {GREEDY_TOKENS} tokens")
    assert agreed >= 0.75 * len(results), results
