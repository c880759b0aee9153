"""Compiled step: counting the collectives of compiled HLO text."""

import textwrap

from keras_vitscale.planning import compiled_step


def test_count_collectives_reads_tuples_and_comments():
    hlo = textwrap.dedent("""
        %all-reduce.5 = (f32[], f32[16,8]{1,0}, /*index=2*/bf16[4]{0}) all-reduce(%a, %b, %c), channel_id=1
        %all-gather = f32[64,32]{1,0} all-gather(f32[8,32]{1,0} %p), dimensions={0}
        ROOT %rs = bf16[2,3]{1,0} reduce-scatter(bf16[16,3]{1,0} %g), dimensions={0}
        %fusion = f32[8]{0} fusion(%x), kind=kLoop, calls=%all-gather.fused
    """)
    out = compiled_step.count_collectives(hlo)
    assert out["all-reduce"] == {"count": 1, "bytes": 4 + 16 * 8 * 4 + 4 * 2}
    assert out["all-gather"] == {"count": 1, "bytes": 64 * 32 * 4}
    assert out["reduce-scatter"] == {"count": 1, "bytes": 2 * 3 * 2}
    assert out["all-to-all"]["count"] == out["collective-permute"]["count"] == 0
