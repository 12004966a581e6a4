import pytest
import torch

from tridlm import masks


def dense_reference(kind: str, cache_lengths: list[int], n: int, prefix: int) -> torch.Tensor:
    """Position-by-position definition: keys are [cache slots 0..prefix-1 | current 0..n-1]."""
    out = torch.zeros(len(cache_lengths), n, prefix + n, dtype=torch.bool)
    for b, length in enumerate(cache_lengths):
        for i in range(n):
            for j in range(prefix + n):
                if j < prefix:
                    out[b, i, j] = j < length
                elif kind == "causal":
                    out[b, i, j] = j - prefix <= i
                else:
                    out[b, i, j] = True
    return out


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
@pytest.mark.parametrize("lengths,n", [([0], 5), ([3], 1), ([4, 0, 7], 3), ([2, 6], 8)])
def test_mask_matches_dense_reference(kind, lengths, n):
    prefix = max(lengths)
    got = getattr(masks, kind)(torch.tensor(lengths), n, prefix)
    assert got.dtype == torch.bool
    assert torch.equal(got, dense_reference(kind, lengths, n, prefix))


def test_cache_slots_beyond_prefix_are_excluded():
    # A prefix wider than every row's length (after a crop) hides the stale slots.
    got = masks.bidirectional(torch.tensor([2, 3]), 2, 5)
    assert torch.equal(got, dense_reference("bidirectional", [2, 3], 2, 5))
    assert not got[:, :, 3:5].any()


def quadratic_reference(lengths: list[int], block: int, prefix: int) -> torch.Tensor:
    """SPEC 3.4 spelled out: token t is draft row t (t < B) or MASK row j of sub-block i."""
    n = block * (block + 1)

    def kind(t):
        return ("draft", t, None) if t < block else ("mask", (t - block) // block, (t - block) % block)

    out = torch.zeros(len(lengths), n, prefix + n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        for q in range(n):
            qk, qi, _ = kind(q)
            for j in range(prefix + n):
                if j < prefix:
                    out[b, q, j] = j < length
                    continue
                kk, ki, _ = kind(j - prefix)
                if kk == "draft":
                    out[b, q, j] = ki <= qi  # drafts 0..i (causal for draft rows)
                else:
                    out[b, q, j] = qk == "mask" and ki == qi  # own sub-block, MASK rows only
    return out


@pytest.mark.parametrize("block,lengths", [(1, [3]), (2, [0, 4]), (4, [5, 2, 7])])
def test_quadratic_mask_matches_reference(block, lengths):
    prefix = max(lengths)
    got = masks.quadratic(torch.tensor(lengths), block * (block + 1), prefix, block=block)
    assert torch.equal(got, quadratic_reference(lengths, block, prefix))


def test_quadratic_offsets():
    assert masks.quadratic_offsets(3).tolist() == [0, 1, 2, 1, 2, 3, 2, 3, 4, 3, 4, 5]
    with pytest.raises(ValueError, match="has 12 tokens, not 11"):
        masks.quadratic(torch.tensor([0]), 11, 0, block=3)


@pytest.mark.parametrize("kind", [masks.causal, masks.bidirectional])
def test_after_own_cache_gives_each_row_the_layout_it_has_alone(kind):
    lengths, n = torch.tensor([5, 2, 0]), 3
    moved, slots = masks.after_own_cache(kind(lengths, n, 5), lengths)
    for b, length in enumerate(lengths.tolist()):
        alone = kind(lengths[b : b + 1], n, length)[0]  # (n, length + n) over [own cache | current]
        assert torch.equal(moved[b, :, : length + n], alone) and not moved[b, :, length + n :].any()
        assert slots[b].tolist() == list(range(length, length + n))
