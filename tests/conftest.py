import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network


@pytest.fixture(scope="session")
def tiny():
    from kvbench.models import load_model

    return load_model("synthetic:tiny", device="cpu")


@pytest.fixture(scope="session")
def embedded():
    from kvbench.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture
def tiny_suite(tmp_path):
    """A small suite file on the tiny random model."""
    path = tmp_path / "tiny.yaml"
    path.write_text(
        "name: tiny\n"
        "model: synthetic:tiny\n"
        "device: cpu\n"
        "workload: {kind: synthetic}\n"
        "strategies: [no_cache, dynamic]\n"
        "baseline: no_cache\n"
        "prompt_tokens: [16, 32]\n"
        "output_tokens: [4]\n"
        "trials: 2\n"
        "warmup: 1\n"
    )
    return path
