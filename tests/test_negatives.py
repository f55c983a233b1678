"""Spec §4 / §14 oracle 8: the "recent" negative set."""

import numpy as np
import pytest
import torch

from model.bank.negatives import RecentNegatives, uses_full_softmax


def check_invariants(cand, targets, batch, k, b):
    assert cand.dtype == torch.int64 and targets.dtype == torch.int64
    assert len(torch.unique(cand)) == len(cand)  # unique
    assert set(batch.tolist()) <= set(cand.tolist())  # contains the current batch
    assert len(cand) <= k + b
    assert torch.equal(cand[targets], torch.as_tensor(batch))  # label index -> the same id


@pytest.mark.parametrize(("k", "b"), [(12, 4), (10, 4), (3, 4)])
def test_distinct_stream(k, b):
    """All ids distinct: after warm-up C = current batch ∪ the last K pushed ids, |C| = min(K+B, seen)."""
    batches = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[: 20 * b].view(20, b)
    bank, history = RecentNegatives(k, b), []
    for t, batch in enumerate(batches):
        cand, targets = bank.candidates(batch)
        check_invariants(cand, targets, batch, k, b)
        recent = torch.cat(history)[-k:] if history else torch.empty(0, dtype=torch.int64)
        assert set(cand.tolist()) == set(batch.tolist()) | set(recent.tolist())
        seen = (t + 1) * b
        assert len(cand) == min(k + b, seen)
        if k % b == 0 and t >= k // b:  # the FIFO is exactly the last K/B batches
            assert set(cand.tolist()) == set(torch.cat(list(batches[t - k // b : t + 1])).tolist())
        bank.push(batch)
        history.append(batch)


def test_repeated_ids_are_deduplicated():
    """A sliding-window-like stream where ids come back within a few batches."""
    rng = np.random.default_rng(1)
    k, b = 16, 8
    bank, history = RecentNegatives(k, b), []
    for _ in range(40):
        batch = rng.choice(30, size=b, replace=False)  # numpy input
        cand, targets = bank.candidates(batch)
        check_invariants(cand, targets, torch.from_numpy(batch), k, b)
        recent = np.concatenate(history)[-k:] if history else np.empty(0, np.int64)
        assert set(cand.tolist()) == set(batch.tolist()) | set(recent.tolist())
        bank.push(batch)
        history.append(batch)


def test_state_dict_round_trip():
    k, b = 10, 4
    batches = [torch.randint(0, 50, (b,), generator=torch.Generator().manual_seed(s)) for s in range(12)]
    a = RecentNegatives(k, b)
    for batch in batches[:7]:
        a.push(batch)
    state = a.state_dict()
    restored = RecentNegatives(k, b)
    restored.load_state_dict(state)
    for batch in batches[7:]:
        for x, y in zip(a.candidates(batch), restored.candidates(batch), strict=True):
            assert torch.equal(x, y)
        a.push(batch)
        restored.push(batch)
    with pytest.raises(ValueError):
        RecentNegatives(k + 1, b).load_state_dict(state)


def test_push_copies_and_bounds():
    bank = RecentNegatives(8, 4)
    buf = torch.tensor([1, 2, 3, 4])
    bank.push(buf)
    buf.fill_(9)  # loaders may recycle their buffers
    cand, _ = bank.candidates(torch.tensor([5, 6]))
    assert cand.tolist() == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="batch_size"):
        bank.candidates(torch.arange(5))
    assert bank.num_batches == 2 and bank.max_candidates == 12


def test_full_softmax_switch():
    assert uses_full_softmax(None, 100) and uses_full_softmax(100, 100) and not uses_full_softmax(99, 100)


def test_fixed_slots_hold_exactly_the_candidate_set():
    """The sync-free form used by the training step: K+B slots whose valid ones are C_t, targets and duplicates
    consistent, before and after the FIFO fills."""
    rng = np.random.default_rng(5)
    neg = RecentNegatives(k=24, batch_size=8)
    for step in range(12):
        ids = torch.from_numpy(rng.choice(40, size=8, replace=False))
        cand, _ = neg.candidates(ids)
        rows, valid, src, targets = neg.candidate_slots(ids)
        assert rows.shape == valid.shape == src.shape == (24 + 8,)
        assert torch.equal(rows[valid], cand)  # the valid slots are C_t, sorted
        assert torch.equal(rows[targets], ids) and valid[targets].all()
        assert torch.equal(rows[src], rows) and valid[src].all()  # every duplicate points at its id's valid slot
        neg.push(ids)
        assert step >= 3 or int(valid.sum()) <= 8 * (step + 1)
