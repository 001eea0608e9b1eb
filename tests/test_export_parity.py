"""Exported graphs (ORT full optimization) equal the PyTorch model with forward hooks.

Tolerance: fp32 kernels differ in summation order, so |onnx - torch| <= ATOL + RTOL*|torch| with
ATOL=1e-4, RTOL=1e-3 on the tiny models; SmolLM2's 30 layers accumulate more, see its test.
"""

import json

import numpy as np
import onnx
import pytest

from tiny_models import torch_reference
from unskill.runtime.session import OnnxLM

ATOL, RTOL = 1e-4, 1e-3


def run_full_prompt(onnx_dir, ids, mask):
    model = OnnxLM(onnx_dir, device="cpu")
    names = model.manifest.key_outputs + model.manifest.preact_outputs + ["logits"]
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in model.input_names:
        feeds["position_ids"] = np.maximum(np.cumsum(mask, 1) - 1, 0)
    past = {n: v.numpy() for n, v in model.empty_past(ids.shape[0]).items()}
    values = dict(zip(names, model.session.run(names, {**feeds, **past})))
    layers = model.manifest.num_layers
    return values["logits"], [values[f"key.{i}"] for i in range(layers)], [values[f"preact.{i}"] for i in range(layers)]


def assert_parity(onnx_dir, hf_dir, ids, mask, atol=ATOL, rtol=RTOL):
    logits, keys, preacts = run_full_prompt(onnx_dir, ids, mask)
    ref_logits, ref_keys, ref_preacts = torch_reference(hf_dir, ids, mask)
    real = mask.astype(bool)   # padded positions are undefined in both
    np.testing.assert_allclose(logits[real], ref_logits[real], atol=atol, rtol=rtol)
    assert len(keys) == len(ref_keys)
    for layer, (got, ref) in enumerate(zip(keys, ref_keys)):
        np.testing.assert_allclose(got[real], ref[real], atol=atol, rtol=rtol, err_msg=f"key layer {layer}")
    for layer, (got, ref) in enumerate(zip(preacts, ref_preacts)):
        np.testing.assert_allclose(got[real], ref[real], atol=atol, rtol=rtol, err_msg=f"preact layer {layer}")


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gpt2"])
def test_tiny_parity_with_torch_hooks(tiny_export, kind):
    hf_dir, onnx_dir = tiny_export(kind)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 500, size=(2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0   # left padding, as the runtime batches
    assert_parity(onnx_dir, hf_dir, ids, mask)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gpt2"])
def test_manifest_describes_graph(tiny_export, kind):
    _, onnx_dir = tiny_export(kind)
    manifest = json.loads((onnx_dir / "unskill.json").read_text())
    model = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    outputs = [o.name for o in model.graph.output]
    assert outputs[0] == "logits"
    assert manifest["num_layers"] == 3 and manifest["key_width"] == (160 if kind == "gpt2" else 96)
    assert manifest["gated"] is (kind != "gpt2")
    assert set(manifest["key_outputs"] + manifest["preact_outputs"]) <= set(outputs)
    assert (onnx_dir / "model.onnx.data").stat().st_size > 0
    assert manifest["fingerprint"].startswith("sha256:")


@pytest.mark.model
def test_smollm2_parity_with_torch_hooks(smollm2_export, tmp_path):
    """Real SmolLM2 (dequantized GGUF): 30 layers of fp32 drift, so atol 2e-3 / rtol 1e-2."""
    from transformers import AutoModelForCausalLM

    from unskill.exporter.sources import resolve_model

    source = resolve_model("smollm2-135m")
    hf_dir = tmp_path / "hf"
    AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file).save_pretrained(hf_dir)
    ids = np.array([[1, 9690, 198, 2683, 314, 253, 5356, 30, 2]], dtype=np.int64)
    assert_parity(smollm2_export, hf_dir, ids, np.ones_like(ids), atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_key_last_outputs_equal_last_position_of_keys(tiny_export, kind):
    _, onnx_dir = tiny_export(kind)
    model = OnnxLM(onnx_dir, device="cpu")
    ids = np.random.default_rng(5).integers(5, 500, size=(2, 7))
    names = model.manifest.key_outputs + model.manifest.key_last_outputs
    _, _, values = model.forward(ids, np.ones_like(ids), model.empty_past(2), names, logits=False)
    for key, last in zip(model.manifest.key_outputs, model.manifest.key_last_outputs):
        np.testing.assert_array_equal(values[last], values[key][:, -1, :])
