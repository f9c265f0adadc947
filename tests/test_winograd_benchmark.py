"""benchmarks/winograd.py --blocks: the variants it builds and the efficiencies it prints (no timing here)."""
from __future__ import annotations


def test_block_rows_pair_each_build_with_its_own_full_block(load_benchmark):
    rows = load_benchmark("winograd").block_rows
    variants = [("block0", 0.0, 400), ("block0", 0.5, 100)]
    # direct: full 4 ms, half 1 ms (4x fewer MACs, 4x faster: 1.0); winograd: full 2 ms, half 1 ms
    # (0.5); round 2 ran everything 2x slower, which the pairing cancels
    times = {(0, "d"): [4.0, 8.0], (1, "d"): [1.0, 2.0], (0, "w"): [2.0, 4.0], (1, "w"): [1.0, 2.0]}
    full, half = rows(times, variants)
    assert "eff_d" not in full and abs(full["paired"] - 0.5) < 1e-12
    assert abs(half["eff_d"] - 1.0) < 1e-12 and abs(half["eff_w"] - 0.5) < 1e-12
    assert abs(half["paired"] - 1.0) < 1e-12 and half["direct"] == 1.5


def test_block_variants_are_the_compile_s_pruned_blocks(load_benchmark):
    import torch

    variants = load_benchmark("winograd").block_variants("mnist_resnet", (0.0, 0.5))
    blocks = sorted({v[0] for v in variants})
    assert blocks and len(variants) == 2 * len(blocks)
    for block in blocks:
        (full, half) = [v for v in variants if v[0] == block]
        assert full[1] == 0.0 and half[1] == 0.5 and half[2] < full[2]
        with torch.no_grad():   # the block's boundary is fixed: same output shape at any ratio
            assert full[3](full[4]).shape == half[3](half[4]).shape
