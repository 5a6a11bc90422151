"""Fixtures shared by the data tests."""
import pytest

from medv_jax.data import testing


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """The small LLaDA-compatible test tokenizer, loaded through AutoTokenizer."""
    return testing.load_test_tokenizer(tmp_path_factory.mktemp("tokenizer"))
