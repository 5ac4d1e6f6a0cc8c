import os


# Offline and quiet before anything imports huggingface_hub / transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402


# Two cores: more than one intra-op thread per process oversubscribes and is 10-100x slower (platform notes §5).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from tiny_models import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_tied_dir(tmp_path_factory):
    """A tied-embedding model (lm_head.weight is embed_tokens.weight), like SmolLM2."""
    from tiny_models import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-tied"), arch="llama_tied")


@pytest.fixture
def tiny_dataset():
    from tiny_models import tiny_text_dataset

    return tiny_text_dataset()
