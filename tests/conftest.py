import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module", autouse=True)
def _demo_samples_off(request):
    """A test module with ``DEMO_SAMPLES = False`` trains the built-in demo without its sample images: it checks
    none, and rendering them took most of each short run. The demo's samples are tested where they are checked
    (test_trainer_demo's real demo run, test_sampling, test_kohya_dataset_e2e)."""
    if getattr(request.module, "DEMO_SAMPLES", True):
        yield
        return
    from library.hina_train import trainer

    with pytest.MonkeyPatch.context() as patch:
        for key in ("sample_prompts", "sample_at_first", "sample_every_n_steps"):
            patch.delitem(trainer.DEMO_SETTINGS, key)
        yield
