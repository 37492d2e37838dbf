"""LLaMA family (Llama, Mistral, Qwen2, SmolLM2): pre-norm blocks, RoPE, gated MLP, optional GQA."""

from lowbit.models.base import Adapter, LinearPair

LLAMA = Adapter(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    blocks_path="model.layers",
    final_norm_path="model.norm",
    linears=(
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ),
    pairs=(
        LinearPair("norm", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        LinearPair("norm", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        LinearPair("linear", "self_attn.v_proj", ("self_attn.o_proj",), per_head=True),
        # RoPE rotates q and k between the projection and the product, so a q↔k matrix does not commute.
        LinearPair("qk", "self_attn.q_proj", ("self_attn.k_proj",), per_head=True, commutes=False),
        # silu(gate) * up: scaling up's output rows scales down's input columns alike (the papers leave it out)
        LinearPair("linear", "mlp.up_proj", ("mlp.down_proj",), elementwise=True),
    ),
    rope=True,
    embed_path="model.embed_tokens",
    residual_writers=("self_attn.o_proj", "mlp.down_proj"),
    rms_norm=True,
)
