"""The Python API in a few lines: load, evaluate, quantize, evaluate, save."""

from lowbit import QuantConfig, evaluate, load_model, quantize, save_quantized
from lowbit.eval import EvalOptions

loaded = load_model()  # SmolLM2-135M-Instruct; or a HF directory, a .gguf file, a hub id
options = EvalOptions(limit=4, progress=False)  # first 4 windows of 2048 tokens: a quick CPU look
before = evaluate(loaded.model, loaded.tokenizer, ["wikitext2"], options)[0].metrics["perplexity"]

config = QuantConfig(method="rtn", wbits=4, abits=8, group_size=64)
quantize(loaded, config)
after = evaluate(loaded.model, loaded.tokenizer, ["wikitext2"], options)[0].metrics["perplexity"]
print(f"wikitext2 (first 4 windows): FP {before:.2f} -> {config.name} {after:.2f}")

save_quantized(loaded, config, "runs/quickstart-w4a8g64", overwrite=True)
