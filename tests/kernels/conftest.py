"""The packed batch the fused-layer and FP8 tests train on (testkit.lora.packed_batch), made once."""

import pytest

from testkit.lora import packed_batch


@pytest.fixture(scope="module")
def batch():
    return packed_batch()
