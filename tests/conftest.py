import pytest
import torch

from crbp_deploy.models import create_model, get_entry, list_models


def tiny_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(name, get_entry(name).tiny).eval()


@pytest.fixture(params=list_models())
def model_name(request):
    return request.param


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # small tensors: a second thread costs more than it gains, and never oversubscribes
