"""Memory sizes: units required, binary and decimal prefixes, printing."""

import pytest

from keras_vitscale.planning import byte_sizes


def test_parse_bytes_reads_units():
    assert byte_sizes.parse_bytes("16GiB") == 16 * 2**30
    assert byte_sizes.parse_bytes("80GB") == 80 * 10**9
    assert byte_sizes.parse_bytes("16G") == 16 * 2**30
    assert byte_sizes.parse_bytes("512B") == 512
    assert byte_sizes.parse_bytes(1024) == 1024   # a number from Python is bytes


def test_parse_bytes_refuses_bad_sizes_and_a_missing_unit():
    with pytest.raises(ValueError, match=r"Cannot read '16 gigs'"):
        byte_sizes.parse_bytes("16 gigs")
    # "16" alone is not read as 16 bytes: the error names the value and the fix.
    with pytest.raises(ValueError, match=r"Cannot read '16'.*no unit.*'16GiB'.*'16B'"):
        byte_sizes.parse_bytes("16")


def test_format_bytes():
    assert byte_sizes.format_bytes(7 * 2**30) == "7.00 GiB"
    assert byte_sizes.format_bytes(100) == "100 B"
