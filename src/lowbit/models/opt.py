"""OPT: pre-norm LayerNorm blocks with biases, learned positions (no RoPE), ReLU MLP."""

from lowbit.models.base import Adapter, LinearPair

OPT = Adapter(
    name="opt",
    model_types=("opt",),
    blocks_path="model.decoder.layers",
    final_norm_path="model.decoder.final_layer_norm",
    linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    pairs=(
        LinearPair("norm", "self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        LinearPair("norm", "final_layer_norm", ("fc1",)),
        LinearPair("linear", "self_attn.v_proj", ("self_attn.out_proj",), per_head=True),
        LinearPair("qk", "self_attn.q_proj", ("self_attn.k_proj",), per_head=True, commutes=True),
        # relu(x / s) = relu(x) / s for s > 0
        LinearPair("linear", "fc1", ("fc2",), elementwise=True, requires=("activation_function", ("relu",))),
    ),
    rope=False,
    rms_norm=False,  # LayerNorm subtracts the mean: a rotation of the residual would not pass it (inputs only)
)
