"""logits_to_keep (issue 18): the LM head on the last position equals the full computation's last row, and a
prompt run in chunks (long prompts) gives the same logits, key_last outputs and KV cache as one pass."""

import numpy as np
import onnx
import pytest

from unskill.runtime import session as session_module
from unskill.runtime.session import LOGITS_TO_KEEP, OnnxLM, left_pad

TOL = dict(atol=1e-5, rtol=1e-4)


def full_and_last(model: OnnxLM, ids, mask):
    past = model.empty_past(ids.shape[0])
    full, _, _ = model.forward(ids, mask, past, all_logits=True)
    last, _, _ = model.forward(ids, mask, model.empty_past(ids.shape[0]))
    return full, last


def check_last_row(onnx_dir, ids, mask):
    model = OnnxLM(onnx_dir, device="cpu")
    assert model.has_logits_to_keep
    full, last = full_and_last(model, ids, mask)
    assert full.shape[:2] == ids.shape and last.shape == (ids.shape[0], full.shape[-1])
    np.testing.assert_allclose(last, full[:, -1, :], **TOL)
    # Fed directly: k rows out of the graph, 0 = all of them (the default, which optimum/genai get).
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in model.input_names:
        feeds["position_ids"] = np.maximum(np.cumsum(mask, 1) - 1, 0)
    feeds.update({n: v.numpy() for n, v in model.empty_past(ids.shape[0]).items()})
    default, = model.session.run(["logits"], feeds)
    two, = model.session.run(["logits"], {**feeds, LOGITS_TO_KEEP: np.array([2], dtype=np.int64)})
    assert default.shape == full.shape and two.shape[1] == 2
    np.testing.assert_allclose(two, full[:, -2:, :], **TOL)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gpt2"])
def test_last_position_logits_equal_full_last_row(tiny_export, kind):
    rng = np.random.default_rng(1)
    ids, mask = left_pad([rng.integers(5, 500, 10).tolist(), rng.integers(5, 500, 7).tolist()], pad=0)
    check_last_row(tiny_export(kind)[1], ids, mask)


def test_graph_keeps_names_and_defaults_to_all_positions(tiny_export):
    _, onnx_dir = tiny_export("llama")
    model = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"] and inputs[-1] == LOGITS_TO_KEEP
    assert [o.name for o in model.graph.output][0] == "logits"
    default = next(i for i in model.graph.initializer if i.name == LOGITS_TO_KEEP)
    assert onnx.numpy_helper.to_array(default).tolist() == [0]
    # optimum builds its feeds from session.get_inputs(): an input with a default is not listed there.
    session = OnnxLM(onnx_dir, device="cpu").session
    assert LOGITS_TO_KEEP not in [i.name for i in session.get_inputs()]
    assert [i.name for i in session.get_overridable_initializers()] == [LOGITS_TO_KEEP]


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_chunked_prompt_equals_one_pass(tiny_export, monkeypatch, kind):
    """Left-padded batch longer than the chunk (gemma3's sliding window is 8, so chunks cross it)."""
    _, onnx_dir = tiny_export(kind)
    model = OnnxLM(onnx_dir, device="cpu")
    rng = np.random.default_rng(2)
    ids, mask = left_pad([rng.integers(5, 500, 23).tolist(), rng.integers(5, 500, 17).tolist()], pad=0)
    outputs = model.manifest.key_last_outputs
    one = model.forward(ids, mask, model.empty_past(2), outputs)
    monkeypatch.setattr(session_module, "PREFILL_CHUNK", 5)
    chunked = model.forward(ids, mask, model.empty_past(2), outputs)
    np.testing.assert_allclose(chunked[0], one[0], **TOL)
    for name in outputs:
        np.testing.assert_allclose(chunked[2][name], one[2][name], **TOL)
    for name, value in one[1].items():
        np.testing.assert_allclose(chunked[1][name].numpy()[0], value.numpy()[0], **TOL)   # row 0: no padding


@pytest.mark.model
def test_smollm2_chunked_last_logits_equal_full_last_row(smollm2_export):
    """A 300-token prompt: three 128-token chunks, LM head on one row, against one pass with every row."""
    model = OnnxLM(smollm2_export, device="cpu")
    if not model.has_logits_to_keep:
        pytest.skip(f"{smollm2_export} predates the logits_to_keep input; re-export it")
    ids = np.random.default_rng(3).integers(100, 40000, size=(1, 300)).astype(np.int64)
    mask = np.ones_like(ids)
    full, _, _ = model.forward(ids, mask, model.empty_past(1), all_logits=True)
    last, _, keys = model.forward(ids, mask, model.empty_past(1), model.manifest.key_last_outputs[-1:])
    np.testing.assert_allclose(last, full[:, -1, :], atol=1e-3, rtol=1e-3)
    assert last.argmax() == full[0, -1].argmax()
