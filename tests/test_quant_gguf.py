"""GGUF Q4_0 / Q4_1 / Q8_0 blocks import into our packed layout without loss."""
import gguf
import numpy as np
import pytest
import torch

from serving.loaders import default_model_path
from serving.loaders.gguf_loader import unpermute_qk
from serving.quant.gguf_import import gguf_tensor_to_weight, import_gguf_blocks
from serving.quant.install import permute_rows
from serving.quant.layout import dequantize


def _gguf_dequantized(data, qtype, shape) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)).reshape(shape)


@pytest.fixture(scope="module")
def bundled_tensors():
    reader = gguf.GGUFReader(default_model_path())
    wanted = ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.17.attn_k.weight")
    return {t.name: t for t in reader.tensors if t.name in wanted}


def test_bundled_tensors_import_bit_identical(bundled_tensors):
    types = set()
    for name, tensor in bundled_tensors.items():
        shape = (int(tensor.shape[1]), int(tensor.shape[0]))
        qw = import_gguf_blocks(tensor.tensor_type.name, tensor.data, shape)
        assert torch.equal(dequantize(qw), _gguf_dequantized(tensor.data, tensor.tensor_type, shape)), name
        types.add((tensor.tensor_type.name, qw.format, qw.group_size))
    # the bundled SmolLM2 is Q4_1 for linear weights and Q8_0 for the embedding
    assert types == {("Q4_1", "int4", 32), ("Q8_0", "int8", 32)}


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1,
                                   gguf.GGMLQuantizationType.Q8_0])
def test_synthetic_blocks_import_bit_identical(qtype):
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((6, 96)) * 0.05).astype(np.float32)
    weight[1] *= 1000  # large scales: -8 * d must stay exact in fp16
    data = gguf.quants.quantize(weight, qtype)
    qw = import_gguf_blocks(qtype.name, data, (6, 96))
    assert torch.equal(dequantize(qw), _gguf_dequantized(data, qtype, (6, 96)))


def test_unpermute_applies_to_packed_rows(bundled_tensors):
    tensor = bundled_tensors["blk.0.attn_q.weight"]
    packed = gguf_tensor_to_weight(tensor, "auto")
    float_weight = gguf_tensor_to_weight(tensor, "none")
    unpermute = lambda t: unpermute_qk(t, 9)  # noqa: E731  SmolLM2-135M has 9 query heads
    assert torch.equal(dequantize(permute_rows(packed, unpermute)), unpermute(float_weight))


def test_policies(bundled_tensors):
    tensor = bundled_tensors["blk.0.ffn_down.weight"]  # Q4_1
    assert isinstance(gguf_tensor_to_weight(tensor, "none"), torch.Tensor)
    assert gguf_tensor_to_weight(tensor, "int4-g32").group_size == 32  # imported as is
    requantized = gguf_tensor_to_weight(tensor, "int4-g128")
    assert (requantized.format, requantized.group_size) == ("int4", 128)
    assert gguf_tensor_to_weight(tensor, "int8").format == "int8"
