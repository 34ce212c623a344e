"""The sized Qwen2.5 shapes of the zoo (quant/zoo.py SCALE_SHAPES), and the pieces of the scale
benchmark (hwbench/bench/bench_scale.py) that need no model: its fit and how it finds the archive.

The parameter counts are held against transformers' own class, built on the meta device (no
memory, so even 3B is checked); the smallest shape is built for real to show the weights are drawn
and saved in bf16.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import fields
from pathlib import Path

import pytest

from edgecds.errors import UnknownNameError
from edgecds.hwbench.bench.bench_scale import archive_beside, plot_svg, power_fit
from edgecds.quant.hf_folder import read_header
from edgecds.quant.zoo import FAMILIES, SCALE_LAYOUT, SCALE_SHAPES, build, build_stamp, find_family, find_scale_shape, scale_family

SHAPE_IDS = [s.name for s in SCALE_SHAPES]


@pytest.mark.parametrize("name", SHAPE_IDS)
def test_each_shape_records_the_parameter_count_transformers_builds(name: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = find_scale_shape(name)
    config = scale_family(shape).config
    values = {k: v for k, v in config.items() if k != "model_type"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **values))
    assert model.num_parameters() == shape.parameters
    assert model.model.layers[0].self_attn.head_dim == shape.hidden_size // shape.num_attention_heads


@pytest.mark.parametrize("name", SHAPE_IDS)
def test_a_shape_is_the_qwen2_family_at_its_size_tied_and_drawn_in_bf16(name: str) -> None:
    shape, base = find_scale_shape(name), find_family(SCALE_LAYOUT)
    family = scale_family(shape)
    assert (family.name, family.architecture, family.gguf_arch, family.init_dtype) == (shape.name, base.architecture, base.gguf_arch, "bfloat16")
    sized = {f.name: getattr(shape, f.name) for f in fields(shape) if f.name.startswith(("hidden", "num_", "intermediate"))}
    assert {k: family.config[k] for k in sized} == sized
    assert family.config["tie_word_embeddings"] is True and "head_dim" not in family.config  # as published: the class derives it
    assert family.config["vocab_size"] == base.config["vocab_size"]  # the zoo's tokenizer


def test_the_families_before_sized_shapes_keep_their_stamps_and_the_sized_ones_name_their_dtype() -> None:
    for family in FAMILIES:
        assert family.init_dtype == "float32"
        assert list(build_stamp(family, {}, 0)) == ["family", "config", "seed", "tokenizer", "builder_version"]
    assert build_stamp(scale_family(SCALE_SHAPES[0]), {}, 0)["init_dtype"] == "bfloat16"


def test_an_unknown_shape_is_answered_with_the_known_ones() -> None:
    with pytest.raises(UnknownNameError, match="unknown scale shape 'qwen2.5-7b'; known: qwen2.5-tiny, qwen2.5-0.2b"):
        find_scale_shape("qwen2.5-7b")


def test_the_shapes_run_smallest_first_and_the_sized_ones_keep_k_quant_rows_or_the_published_widths() -> None:
    counts = [s.parameters for s in SCALE_SHAPES]
    assert counts == sorted(counts)
    small = find_scale_shape("qwen2.5-0.2b")
    assert small.hidden_size % 256 == 0 and small.intermediate_size % 256 == 0


def test_the_tiny_shape_builds_in_bf16_with_its_parameter_count(tmp_path: Path) -> None:
    shape = find_scale_shape("qwen2.5-tiny")
    (tmp_path / "no-tokenizer").mkdir()
    folder = build(scale_family(shape), tmp_path / "no-tokenizer", into=tmp_path / shape.name)
    header, _ = read_header(folder / "model.safetensors")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert {t["dtype"] for t in tensors.values()} == {"BF16"}
    assert sum(math.prod(t["shape"]) for t in tensors.values()) == shape.parameters  # tied: no lm_head saved
    assert "lm_head.weight" not in tensors


def test_the_power_fit_recovers_an_exponent_and_says_when_it_cannot() -> None:
    fit = power_fit([(1e8, 3.0 * 1e8**1.5), (4e8, 3.0 * 4e8**1.5), (1.4e9, 3.0 * 1.4e9**1.5)])
    assert fit["n"] == 3 and fit["exponent"] == pytest.approx(1.5) and fit["r2"] == pytest.approx(1.0)
    noisy = power_fit([(1e8, 1.0), (4e8, 5.0), (1.4e9, 12.0), (2.9e9, 40.0)])
    assert 0 < noisy["r2"] < 1
    assert power_fit([(1e8, 2.0)]) == {"n": 1, "exponent": None, "r2": None, "note": "needs at least two sizes"}
    assert "by construction" in power_fit([(1e8, 2.0), (2e8, 3.0)])["note"]


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_the_archive_is_found_beside_the_bundle_whatever_its_tar_suffix(tmp_path: Path, suffix: str) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert archive_beside(bundle) is None
    (tmp_path / f"bundle{suffix}").write_bytes(b"x")
    (tmp_path / "other.tar").write_bytes(b"x")
    assert archive_beside(bundle) == tmp_path / f"bundle{suffix}"


def test_the_plot_is_an_svg_with_one_series_per_step_that_succeeded() -> None:
    def sample(seconds: float, rss: int, ok: bool = True) -> dict[str, object]:
        return {"ok": ok, "wall_s": seconds, "tree_peak_rss_bytes": rss}

    report = {"created": "now", "layout": "Qwen2.5", "host": {"machine": "x86_64", "processor": "", "cpus": 2},
              "fits": {}, "sizes": [{"parameters": p, "steps": {"build": sample(p / 1e8, int(p)), "plan": sample(1.0, 2**26, ok=False)}}
                                    for p in (2e8, 4e8, 1.4e9)]}
    root = ET.fromstring(plot_svg(report))
    ns = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{ns}polyline")) == 2  # build in both panels; plan failed everywhere
    assert len(root.findall(f"{ns}circle")) == 2 * 3 + 1  # its markers, and its legend's
