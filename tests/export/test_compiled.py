"""torch.compile over packed models: one graph (the packed matmul is one custom op) and the eager model's logits."""

import torch
import torch._dynamo.testing

from lowbit.export.compiled import prepare_for_compile, w4a16_linear_op
from lowbit.export.inplace import pack_rtn, random_llama
from lowbit.kernels.weights import PackedWeight

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=384, max_position_embeddings=128)


def packed_llama(device="cpu"):
    model = random_llama(device, torch.float32, seed=0, **TINY)
    pack_rtn(model, 4, 32)
    return model.eval()


def compiled_logits(model, ids):
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=counter, fullgraph=True)(input_ids=ids).logits
    return out, counter


def test_compiled_packed_model_is_one_graph_with_eager_logits():
    model = packed_llama()
    ids = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    out, counter = compiled_logits(model, ids)
    assert counter.frame_count == 1  # fullgraph=True would have raised on a graph break
    ops = {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("lowbit.w4a16_linear" in op for op in ops)
    assert torch.equal(out, eager)


def test_op_passes_torch_opcheck_and_matches_the_reference():
    weight = PackedWeight.quantize(torch.randn(24, 64, generator=torch.Generator().manual_seed(1)), 4, 32)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(24)
    args = (x, weight.packed, weight.scales, weight.zeros, bias, None, None, None, 4, 32, 0)
    torch.library.opcheck(w4a16_linear_op, args)
    torch.testing.assert_close(w4a16_linear_op(*args), x @ weight.dequantize().T + bias)


def test_prepare_for_compile_builds_nothing_on_the_reference_path(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNELS", "reference")
    assert prepare_for_compile(packed_llama(), torch.float32) == 0


def test_compiled_static_cache_decode_matches_uncompiled(batch=2):
    """The benchmark's compiled decode step (aot_eager here; Inductor on the GPU) gives the eager step's tokens."""
    from lowbit.bench import GraphDecoder

    model = packed_llama()
    prompt = torch.randint(0, 384, (batch, 6), generator=torch.Generator().manual_seed(batch))
    torch._dynamo.reset()
    runs = []
    for compile in (False, True):
        decoder = GraphDecoder(model, prompt, decode_tokens=5, capture=False, compile=compile,
                               compile_backend="aot_eager")
        tokens = [decoder.token.clone()]
        for _ in range(5):
            decoder.decode(1)
            tokens.append(decoder.token.clone())
        runs.append(torch.cat(tokens, 1))
    assert torch.equal(runs[0], runs[1])


# last in the module: the triton_path fixture keeps the Triton kernels on for the module's remaining tests
def test_compiled_packed_model_on_the_triton_kernels(triton_path):
    """With layouts prepared before tracing, the op runs the Triton GEMV/GEMM (interpreter on CPU) as eager does."""
    device = triton_path("lowbit.kernels.w4a16_gemv", "lowbit.kernels.w4a16", autotune=False)
    model = packed_llama(device)
    assert prepare_for_compile(model, torch.float32) == 2 * 7  # every packed linear of the two blocks
    for length in (1, 5):  # the GEMV (one row) and the GEMM
        ids = torch.randint(0, 384, (1, length), generator=torch.Generator().manual_seed(length), device=device)
        with torch.no_grad():
            eager = model(input_ids=ids).logits
        out, counter = compiled_logits(model, ids)
        assert counter.frame_count == 1
        torch.testing.assert_close(out, eager, rtol=0, atol=1e-5)
