"""Property: the character bound of ``SampleRenderer`` only drops samples that tokenising would drop too."""

from __future__ import annotations

from typing import Any

import pytest
from _budget import PROPERTY, within_budget
from _data_helpers import make_processor, text_sample
from hypothesis import given, settings
from hypothesis import strategies as st

from vl_train.data.format import DataStats
from vl_train.data.render import SampleRenderer

_WORDS = st.sampled_from(["describe", "assistant", " ", "\n", "中", "x", "é", "e\u0301", "<think>", "    "])


@pytest.fixture(scope="module")
def processor() -> Any:
    return make_processor()


@settings(PROPERTY, max_examples=30)
@given(words=st.lists(_WORDS, max_size=120), max_length=st.integers(1, 200))
def test_early_drop_never_drops_what_fits(processor: Any, words: list[str], max_length: int) -> None:
    sample = text_sample("p", answer="".join(words) or "a")
    full = SampleRenderer(processor)(sample)
    assert full is not None
    stats = DataStats()
    out = within_budget(SampleRenderer(processor, max_length=max_length, stats=stats), sample)
    assert (out is None) == (len(full) > max_length)
