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
