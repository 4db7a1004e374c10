"""DDP proven equal to one process: Lightning's DDP over gloo with two CPU processes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_equivalence.py"


@pytest.fixture(scope="module")
def ddp_outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    completed = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True,
                               text=True, timeout=600, cwd=SCRIPT.parent)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out


@pytest.mark.parametrize("loss_name", ["nt_xent", "supcon"])
def test_gathered_loss_and_gradients_equal_one_process_on_the_concatenated_batch(ddp_outputs,
                                                                                 loss_name):
    sys.path.insert(0, str(SCRIPT.parent))
    from ddp_equivalence import encoder, fixed_batch, losses

    data = fixed_batch()
    model = encoder()
    loss = losses(model, data["x1"], data["x2"], data["labels"], gather=False)[loss_name]
    loss.backward()
    recorded = torch.load(ddp_outputs / f"{loss_name}.pt", weights_only=True)
    # Each process averages over its own anchors; the mean of the two is the global mean.
    assert recorded["losses"].mean().item() == pytest.approx(loss.item(), rel=1e-5)
    for name, parameter in model.named_parameters():
        assert torch.allclose(recorded["grads"][name], parameter.grad, rtol=1e-5, atol=1e-7), name


def test_moco_queue_receives_the_keys_of_every_process_before_the_next_step(ddp_outputs):
    recorded = torch.load(ddp_outputs / "moco.pt", weights_only=True)
    rank0, rank1 = recorded["queues"]
    assert torch.equal(rank0, rank1)  # one global queue, identical on every process
    assert recorded["pointer"].item() == 8  # 4 keys from each of the 2 processes
