"""Zero-shot scoring: the shipped tasks in lm-eval's format, lm-eval's tokenization, batching and metrics."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model

from lowbit.errors import LowbitError
from lowbit.eval import zeroshot
from lowbit.eval.zeroshot import (
    ZEROSHOT_TASKS,
    Item,
    ZeroShotResult,
    encode_pair,
    evaluate_zeroshot,
    lambada_metrics,
    load_task,
    loglikelihoods,
    multiple_choice_metrics,
)


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama")


def hand_loglik(model, tokenizer, context: str, continuation: str, max_length: int | None = None):
    """One unbatched forward pass over context + continuation, scored by hand."""
    whole = tokenizer(context + continuation).input_ids
    n_cont = len(whole) - len(tokenizer(context).input_ids)
    if max_length is not None:
        whole = whole[-(max_length + 1) :]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = range(len(whole) - n_cont, len(whole))
    ll = sum(logprobs[p - 1, whole[p]].item() for p in positions)
    greedy = all(logprobs[p - 1].argmax().item() == whole[p] for p in positions)
    return ll, greedy


# ---------------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize(
    "task, count", [("piqa", 1838), ("arc_easy", 2376), ("arc_challenge", 1172), ("lambada", 5153)]
)
def test_task_sizes(task, count):
    items = load_task(task)
    assert len(items) == count
    assert all(0 <= item.gold < len(item.choices) for item in items)
    assert all(choice.startswith(" ") for item in items for choice in item.choices)


def test_piqa_first_item_is_lm_eval_format():
    item = load_task("piqa")[0]
    assert item.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    common = "Provide the guinea pig with a cage full of a few inches of bedding made of ripped "
    tail = ", you will also need to supply it with a water bottle and a food dish."
    assert item.choices == (" " + common + "paper strips" + tail, " " + common + "jeans material" + tail)
    assert item.gold == 0


def test_arc_first_items_are_lm_eval_format():
    easy = load_task("arc_easy")[0]
    assert easy.context == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    )
    assert easy.choices == (
        " Sunlight is the source of energy for nearly all ecosystems.",
        " Most ecosystems are found on land instead of in water.",
        " Carbon dioxide is more available than other gases.",
        " The producers in all ecosystems are plants.",
    )
    assert easy.gold == 0
    challenge = load_task("arc_challenge")[0]
    assert challenge.context.startswith("Question: An astronomer observes that a planet rotates faster")
    assert challenge.context.endswith("increase in rotation?\nAnswer:")
    assert challenge.choices[2] == " Planetary days will become shorter."
    assert challenge.gold == 2  # answerKey "C"


def test_arc_numeric_labels():
    item = load_task("arc_easy")[14]  # labels "1".."4", answerKey "2"
    assert item.context == "Question: All living and nonliving material is composed of\nAnswer:"
    assert item.choices == (" air", " elements", " water", " soil")
    assert item.gold == 1


def test_lambada_first_item_is_lm_eval_format():
    item = load_task("lambada")[0]
    assert item.context.startswith("In my palm is a clear stone, and inside it is a small ivory statuette.")
    assert item.context.endswith("his mouth curved in a confident grin, I don't care about")
    assert item.choices == (" signs",)
    assert item.gold == 0


def test_limit_keeps_the_first_items():
    assert load_task("arc_challenge", limit=3) == load_task("arc_challenge")[:3]
    with pytest.raises(LowbitError):
        load_task("piqa", limit=0)


def test_unknown_task_is_one_line_listing_the_choices(llama, tiny_tokenizer):
    with pytest.raises(LowbitError) as err:
        load_task("hellaswag")
    message = str(err.value)
    assert "\n" not in message and "hellaswag" in message
    assert all(task in message for task in ZEROSHOT_TASKS)
    with pytest.raises(LowbitError):
        evaluate_zeroshot(llama, tiny_tokenizer, "arc", progress=False)


# ---------------------------------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("spaces", [" ", "  "])
def test_encode_pair_moves_trailing_spaces(tiny_tokenizer, spaces):
    context, continuation = "Question: Where is the cat?\nAnswer:" + spaces, "on the mat"
    ctx, cont = encode_pair(tiny_tokenizer, context, continuation)
    assert ctx == tiny_tokenizer(context.rstrip()).input_ids
    assert ctx + cont == tiny_tokenizer(context + continuation).input_ids
    assert tiny_tokenizer.decode(cont) == spaces + continuation


def test_encode_pair_splits_the_joint_tokenization(tiny_tokenizer):
    context, continuation = "The cat sat on th", "e mat"  # the boundary falls inside a word
    ctx, cont = encode_pair(tiny_tokenizer, context, continuation)
    whole = tiny_tokenizer(context + continuation).input_ids
    assert ctx == tiny_tokenizer(context).input_ids
    assert cont == whole[len(ctx) :]


def test_empty_context_gets_the_prefix_token(tiny_tokenizer):
    ctx, cont = encode_pair(tiny_tokenizer, "", " hello")
    assert ctx == [tiny_tokenizer.eos_token_id]  # no BOS in this tokenizer, so EOS as lm-eval does
    assert cont == tiny_tokenizer(" hello").input_ids


# ---------------------------------------------------------------------------------------------------- scoring


def test_loglikelihood_matches_a_hand_computation(llama, tiny_tokenizer):
    item = load_task("piqa", limit=1)[0]
    [(ll, greedy)] = loglikelihoods(llama, tiny_tokenizer, [(item.context, item.choices[1])], progress=False)
    want_ll, want_greedy = hand_loglik(llama, tiny_tokenizer, item.context, item.choices[1])
    assert ll == pytest.approx(want_ll, abs=1e-4)
    assert greedy == want_greedy


def test_left_truncation_keeps_the_continuation(llama, tiny_tokenizer):
    item = load_task("lambada", limit=1)[0]
    [(ll, _)] = loglikelihoods(llama, tiny_tokenizer, [(item.context, item.choices[0])], max_length=8, progress=False)
    assert ll == pytest.approx(hand_loglik(llama, tiny_tokenizer, item.context, item.choices[0], 8)[0], abs=1e-4)
    with pytest.raises(LowbitError, match="max_length"):
        loglikelihoods(llama, tiny_tokenizer, [("Question:", " " + "word " * 20)], max_length=4, progress=False)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_batched_equals_unbatched(tiny_tokenizer, arch):
    model = make_tiny_model(arch)
    requests = [(item.context, choice) for task in ("piqa", "arc_challenge", "lambada")
                for item in load_task(task, limit=4) for choice in item.choices]
    one = loglikelihoods(model, tiny_tokenizer, requests, batch_size=1, progress=False)
    seven = loglikelihoods(model, tiny_tokenizer, requests, batch_size=7, progress=False)
    assert len(one) == len(seven) == len(requests)
    for (ll1, g1), (ll7, g7) in zip(one, seven):
        assert ll1 == pytest.approx(ll7, abs=1e-4)
        assert g1 == g7


# ---------------------------------------------------------------------------------------------------- metrics


def test_multiple_choice_metrics_by_hand():
    items = [
        Item("q1", (" a", " bbbbbbbb"), 0),  # acc picks 0 (-4 > -6); acc_norm picks 1 (-6/8 > -4/1)
        Item("q2", (" a", " bbb"), 1),  # acc picks 0; per character without the space: -1/1 < -2.5/3 -> 1
        Item("q3", (" x", " y", " z"), 2),  # both pick 2
        Item("q4", (" x", " y"), 0),  # both pick 1 (wrong)
    ]
    logliks = [[-4.0, -6.0], [-1.0, -2.5], [-3.0, -2.0, -1.0], [-2.0, -1.0]]
    metrics = multiple_choice_metrics(items, logliks)
    assert metrics["acc"] == pytest.approx(0.5)  # q1, q3
    assert metrics["acc_norm"] == pytest.approx(0.5)  # q2, q3
    assert metrics["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 3))
    # q2's lengths counted with the delimiter space (-1/2 > -2.5/4) would pick choice 0 instead
    assert multiple_choice_metrics(items[1:2], logliks[1:2])["acc_norm"] == 1.0
    perfect = multiple_choice_metrics(items, [[0.0 if i == it.gold else -9.0 for i in range(len(it.choices))]
                                              for it in items])
    assert perfect["acc"] == perfect["acc_norm"] == 1.0 and perfect["acc_stderr"] == 0.0


def test_lambada_metrics_by_hand():
    metrics = lambada_metrics([(-1.0, True), (-2.0, False), (-6.0, True), (-3.0, True)])
    assert metrics["acc"] == pytest.approx(0.75)
    assert metrics["acc_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert metrics["perplexity"] == pytest.approx(math.exp(3.0))


@pytest.mark.parametrize("task", ZEROSHOT_TASKS)
def test_rigged_scores_give_full_accuracy(monkeypatch, task):
    """The results are matched back to the right items and choices (ARC has 3 to 5 choices per question)."""
    items = load_task(task, limit=60)
    gold = {(item.context, item.choices[item.gold]) for item in items}

    def rigged(model, tokenizer, requests, *args, **kwargs):
        return [(-0.5, True) if request in gold else (-1e4, False) for request in requests]

    monkeypatch.setattr(zeroshot, "loglikelihoods", rigged)
    result = evaluate_zeroshot(None, None, task, limit=60, progress=False)
    assert result.n == 60 and result.metrics["acc"] == 1.0
    if task == "lambada":
        assert result.metrics["perplexity"] == pytest.approx(math.exp(0.5))
    else:
        assert result.metrics["acc_norm"] == 1.0


@pytest.mark.parametrize("task", ZEROSHOT_TASKS)
def test_evaluate_zeroshot_on_a_tiny_model(llama, tiny_tokenizer, task):
    result = evaluate_zeroshot(llama, tiny_tokenizer, task, limit=5, batch_size=4, device="cpu", progress=False)
    assert isinstance(result, ZeroShotResult) and result.task == task and result.n == 5
    keys = {"acc", "acc_stderr", "perplexity"} if task == "lambada" else {
        "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert set(result.metrics) == keys
    assert 0.0 <= result.metrics["acc"] <= 1.0
    if task == "lambada":
        assert math.isfinite(result.metrics["perplexity"]) and result.metrics["perplexity"] > 1.0
