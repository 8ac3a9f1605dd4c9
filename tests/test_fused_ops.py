"""The fused CPU decoder ops against the torch expressions they replace, and a model run on each path."""
import pytest
import torch

from kernels.cpu_ops import _fused_ops
from kernels.paged_attention import AttentionMetadata, PrefillChunk, write_kv
from serving.models.llama import LlamaForCausalLM, ModelArgs, RMSNorm
from serving.models.rope import RotaryEmbedding
from cpu_builds import require


@pytest.fixture
def built_ops():
    return require(_fused_ops)


needs_ops = pytest.mark.usefixtures("built_ops")


def _torch_path(monkeypatch):
    for where in ("serving.models.llama", "serving.models.rope", "kernels.paged_attention"):
        monkeypatch.setattr(f"{where}.fused_ops", lambda x=None: None)


@needs_ops
@pytest.mark.parametrize("num_tokens,dim", [(1, 576), (7, 40), (130, 64)])
def test_rms_norm_and_residual_add(monkeypatch, num_tokens, dim):
    torch.manual_seed(0)
    norm = RMSNorm(dim, 1e-5)
    norm.weight.data = torch.randn(dim)
    x, residual = torch.randn(num_tokens, dim) * 3, torch.randn(num_tokens, dim)
    fused_residual, torch_residual = residual.clone(), residual.clone()
    fused = norm(x, fused_residual)
    plain = norm(x)
    _torch_path(monkeypatch)
    torch.testing.assert_close(plain, norm(x), rtol=1e-6, atol=1e-6)  # only the sum of squares adds in another order
    torch.testing.assert_close(fused, norm(x, torch_residual), rtol=1e-6, atol=1e-6)
    assert torch.equal(fused_residual, torch_residual) and torch.equal(fused_residual, residual + x)


@needs_ops
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (4, 1, 6)])
def test_rotary_in_place_is_exact(num_heads, num_kv_heads, head_dim):
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim, 300, 10000.0, {"rope_type": "llama3", "factor": 8.0,
                                                    "original_max_position_embeddings": 64})
    num_tokens = 11
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim)
    positions = torch.randint(0, 300, (num_tokens,))
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q_ref, k_ref = rope(positions, q.reshape(num_tokens, num_heads, head_dim),
                        k.reshape(num_tokens, num_kv_heads, head_dim))
    v_before = v.clone()
    assert rope.rotate_qkv_(positions, qkv, num_heads, num_kv_heads)
    assert torch.equal(q.reshape(q_ref.shape), q_ref) and torch.equal(k.reshape(k_ref.shape), k_ref)
    assert torch.equal(v, v_before)
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        rope.rotate_qkv_(torch.full((num_tokens,), 300), qkv, num_heads, num_kv_heads)


@pytest.mark.parametrize("num_tokens,intermediate", [(1, 1536), (5, 37), (64, 96)])
def test_silu_mul_matches_torch(built_ops, num_tokens, intermediate):
    torch.manual_seed(0)
    gate_up = torch.randn(num_tokens, 2 * intermediate) * 4
    gate_up[0, :4] = torch.tensor([-200.0, -88.0, 0.0, 120.0])  # past both ends of the exponential's range
    gate, up = gate_up.split(intermediate, dim=-1)
    out = built_ops.silu_mul(gate_up)
    ref = torch.nn.functional.silu(gate) * up
    assert out.shape == ref.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-30)
    # a row's result does not depend on the rest of the call
    assert torch.equal(built_ops.silu_mul(gate_up[-1:]), out[-1:])
    with pytest.raises(RuntimeError, match="even number of columns"):
        built_ops.silu_mul(torch.randn(2, 5))


@needs_ops
def test_kv_write_matches_index_copy(monkeypatch):
    torch.manual_seed(0)
    qkv = torch.randn(5, 9 * 8)  # k and v are strided views into the fused projection, as in the model
    k, v = qkv[:, 24:48].view(5, 3, 8), qkv[:, 48:].view(5, 3, 8)
    slots = torch.tensor([9, 0, 31, 4, 17])
    caches = [torch.zeros(4, 8, 3, 8) for _ in range(4)]
    write_kv(k, v, caches[0], caches[1], slots)
    _torch_path(monkeypatch)
    write_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="slot 32 is outside the cache"):
        write_kv(k, v, caches[0], caches[1], torch.tensor([0, 1, 2, 3, 32]))


@needs_ops
def test_model_forward_fused_and_torch_paths_agree(monkeypatch):
    torch.manual_seed(0)
    args = ModelArgs(arch="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                     num_kv_heads=2, head_dim=16, max_position_embeddings=64)
    model = LlamaForCausalLM(args)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    num_tokens, block_size = 13, 4

    def run():
        caches = [(torch.zeros(8, block_size, 2, 16), torch.zeros(8, block_size, 2, 16)) for _ in range(3)]
        meta = AttentionMetadata(positions=torch.arange(num_tokens), slot_mapping=torch.arange(num_tokens),
                                 logits_indices=torch.tensor([4, num_tokens - 1]), block_size=block_size)
        meta.prefills.append(PrefillChunk(0, num_tokens, 0, torch.arange(4)))
        with torch.inference_mode():
            return model(torch.randint(0, 97, (num_tokens,), generator=torch.Generator().manual_seed(1)), meta,
                         caches), caches

    fused, fused_caches = run()
    _torch_path(monkeypatch)
    plain, plain_caches = run()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for (k0, v0), (k1, v1) in zip(fused_caches, plain_caches):
        torch.testing.assert_close(k0, k1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v0, v1, rtol=1e-5, atol=1e-5)
