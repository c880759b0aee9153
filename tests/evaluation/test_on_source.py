"""Few-shot evaluation on a data source's splits: shots are checked first."""

import pytest

from keras_vitscale.evaluation.on_source import check_shots


def test_check_shots_accepts_positive_lists_and_names_the_flag():
    assert check_shots("1,5,10") == [1, 5, 10]
    assert check_shots((2,)) == [2]
    for bad in ("0", "1,-2", "", "a", ()):
        with pytest.raises(ValueError, match="--shots"):
            check_shots(bad)
    with pytest.raises(ValueError, match="--fewshot"):
        check_shots("0", flag="--fewshot")
