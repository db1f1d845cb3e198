"""Shared fixtures. The real SmolLM2 model is loaded once per session (from the labkit cache)."""
import pytest
import torch


@pytest.fixture(scope="session")
def smollm2():
    import labkit as lk
    model, tok = lk.load_model("smollm2-135m")
    return model, tok


@pytest.fixture()
def tiny():
    import labkit as lk
    return lk.models.tiny_llama(seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
