"""The committee maths against first principles and a per-record brute-force Algorithm 1."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from models import committee
from models.committee import Aggregation, Confidence


def test_confidence_functions_on_known_values():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    np.testing.assert_allclose(committee.confidence(logits, Confidence.MAX_PROB), [p.max(), 1 / 3])
    np.testing.assert_allclose(committee.confidence(logits, Confidence.PROB_GAP), [p[0] - p[1], 0.0], atol=1e-12)
    np.testing.assert_allclose(committee.confidence(logits, Confidence.LOGIT_GAP), [1 - np.exp(-1.0), 0.0], atol=1e-12)
    entropy = -(p * np.log(p)).sum()
    np.testing.assert_allclose(committee.confidence(logits, Confidence.NEG_ENTROPY),
                               [1 - entropy / np.log(3), 0.0], atol=1e-12)


@pytest.mark.parametrize("kind", list(Confidence))
def test_confidence_in_unit_interval_and_monotone_in_sharpness(kind):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 10))
    conf = committee.confidence(logits, kind)
    assert np.all((conf >= 0) & (conf <= 1))
    # scaling logits up sharpens every distribution: no confidence may drop
    assert np.all(committee.confidence(logits * 3, kind) >= conf - 1e-12)


def test_probability_aggregation_is_mean_of_softmax():
    rng = np.random.default_rng(1)
    stack = rng.normal(size=(3, 5, 7))
    combined = committee.ensemble(stack, Aggregation.PROBS)
    np.testing.assert_allclose(committee.softmax(combined), committee.softmax(stack).mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(committee.ensemble(stack, Aggregation.LOGITS), stack.mean(axis=0), atol=1e-6)


def brute_force(stack, thresholds, gmacs, kind, aggregation):
    """Algorithm 1 record by record, written independently of committee.cascade."""
    preds, stages, costs = [], [], []
    for i in range(stack.shape[1]):
        members = []
        for k in range(stack.shape[0]):
            row = stack[k, i]
            if Aggregation(aggregation) is Aggregation.PROBS:
                e = np.exp(row - row.max())
                members.append(e / e.sum())
            else:
                members.append(row.astype(np.float64))
            mean = np.mean(members, axis=0)
            if Aggregation(aggregation) is Aggregation.LAST:
                logits = members[-1]
            else:
                logits = mean if Aggregation(aggregation) is Aggregation.LOGITS else np.log(mean)
            conf = committee.confidence(logits[None], kind)[0]
            last = k == stack.shape[0] - 1
            if last or (thresholds[k] < 1 and conf >= thresholds[k]):
                preds.append(int(np.argmax(logits)))
                stages.append(k + 1)
                costs.append(sum(gmacs[: k + 1]))
                break
    return np.array(preds), np.array(stages), np.array(costs)


@settings(max_examples=60, deadline=None)
@given(
    stack=arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 20), st.integers(2, 6)),
                 elements=st.floats(-8, 8, width=32)),
    data=st.data(),
    kind=st.sampled_from(list(Confidence)),
    aggregation=st.sampled_from(list(Aggregation)),
)
def test_cascade_equals_brute_force(stack, data, kind, aggregation):
    m = stack.shape[0]
    thresholds = data.draw(st.lists(st.sampled_from([0.0, 0.2, 0.5, 0.7, 0.9, 1.0]), min_size=m - 1, max_size=m - 1))
    gmacs = [0.4, 0.6, 0.9, 1.3][:m]
    result = committee.cascade(stack, thresholds, gmacs, kind, aggregation)
    preds, stages, costs = brute_force(stack, thresholds, gmacs, kind, aggregation)
    np.testing.assert_array_equal(result.exit_stage, stages)
    np.testing.assert_allclose(result.gmacs, costs)
    # argmax ties may break differently between the two; compare the combined score of the chosen class
    chosen = np.take_along_axis(result.logits, result.pred[:, None], 1)[:, 0]
    best = np.take_along_axis(result.logits, preds[:, None], 1)[:, 0]
    np.testing.assert_allclose(chosen, best, atol=1e-9)


def test_thresholds_zero_is_first_model_and_one_is_ensemble():
    rng = np.random.default_rng(2)
    stack = rng.normal(size=(3, 50, 10)).astype(np.float32)
    first = committee.cascade(stack, [0.0, 0.0], [1, 2, 3])
    np.testing.assert_array_equal(first.pred, stack[0].argmax(-1))
    assert set(first.exit_stage) == {1} and np.allclose(first.gmacs, 1)
    full = committee.cascade(stack, [1.0, 1.0], [1, 2, 3])
    np.testing.assert_array_equal(full.pred, committee.ensemble(stack).argmax(-1))
    assert set(full.exit_stage) == {3} and np.allclose(full.gmacs, 6)
    np.testing.assert_allclose(full.exit_ratios(3), [0, 0, 1])


def test_threshold_one_never_exits_even_at_saturated_confidence():
    stack = np.zeros((2, 1, 3), dtype=np.float32)
    stack[:, 0, 0] = 1000.0  # softmax max is exactly 1.0 in floating point
    assert committee.cascade(stack, [1.0]).exit_stage[0] == 2
    assert committee.cascade(stack, [0.999]).exit_stage[0] == 1


def test_wrong_threshold_count_is_refused():
    with pytest.raises(ValueError, match="3 models need 2 thresholds"):
        committee.cascade(np.zeros((3, 2, 4)), [0.5])


def test_every_confidence_function_has_a_numpy_and_a_torch_implementation():
    assert set(committee.CONFIDENCE_FUNCTIONS) == set(Confidence)
    for kind, impl in committee.CONFIDENCE_FUNCTIONS.items():
        assert callable(impl.numpy) and callable(impl.torch), kind


@pytest.mark.parametrize("kind", list(Confidence))
def test_torch_confidence_agrees_with_numpy_and_does_not_saturate(kind):
    import torch

    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(300, 50))
    gaps = np.linspace(0.0, 40.0, 300)  # up to far beyond float32's 1 - 2**-24 at a gap of ~17
    logits[np.arange(300), rng.integers(0, 50, 300)] += gaps
    want = committee.confidence(logits, kind)
    got = committee.confidence_torch(torch.as_tensor(logits, dtype=torch.float32), kind).numpy()
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    # confident records keep distinct scores: percentile candidates among them do not merge into 1.0
    top = np.argsort(want)[-40:]
    assert (got[top] < 1.0).all() == (want[top] < 1.0).all()
    assert len(np.unique(got[top])) >= len(np.unique(want[top])) - 2
