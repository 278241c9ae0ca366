"""Fixtures shared by unit test files."""
import pytest

from bertray import config as C


@pytest.fixture
def lora_model_cfg():
    """`f(base, **adapter)`: a fine-tuning model config with a LoRA adapter, validated as a user's file would be."""
    def make(base: str, **adapter) -> C.ModelConfig:
        return C.load(C.FinetuneConfig, data={"data": {"train": "x"},
                                              "model": {"base": base, "adapter": {"kind": "lora", **adapter}}}).model
    return make
