"""A method's loss functions work with any model and a plain DataLoader (README: "Copying a method into your own
project"): TNA's and DML's losses on two torchvision ResNet-18s fed by torch.utils.data.DataLoader."""
import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import dml
import tna
from conftest import require_cifar10_sample


def sample_loader(batch_size=16, images=64):
    arrays = np.load(require_cifar10_sample())
    x = torch.from_numpy(arrays["x_train"][:images]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(arrays["y_train"][:images]).long()
    return DataLoader(TensorDataset((x - 0.5) / 0.25, y), batch_size=batch_size, shuffle=True)


def two_resnet18s():
    torch.manual_seed(0)
    return [torchvision.models.resnet18(num_classes=10) for _ in range(2)]


def test_tna_loss_trains_two_torchvision_networks_from_a_dataloader():
    base, twin = two_resnet18s()
    optimizer = torch.optim.SGD([*base.parameters(), *twin.parameters()], lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in (base.fc.weight, twin.fc.weight)]
    for images, labels in sample_loader():
        loss, ce_base, ce_twin, match = tna.tna_loss(base(images), twin(images), labels, alpha=5e-3)
        optimizer.zero_grad()
        loss.backward()
        assert twin.conv1.weight.grad.abs().sum() > 0 and base.conv1.weight.grad.abs().sum() > 0
        optimizer.step()
        assert torch.isfinite(loss) and match > 0  # independently initialised networks: their logits differ
    assert all(not torch.equal(b, p) for b, p in zip(before, (base.fc.weight, twin.fc.weight)))


def test_dml_loss_trains_each_student_on_its_own_term():
    students = two_resnet18s()
    optimizers = [torch.optim.SGD(s.parameters(), lr=0.01) for s in students]
    images, labels = next(iter(sample_loader()))
    losses, cross_entropies, kls = dml.dml_loss([s(images) for s in students], labels)
    for optimizer in optimizers:
        optimizer.zero_grad()
    losses[0].backward()  # detached peers: student 1's loss gives student 2 no gradient
    assert students[0].fc.weight.grad.abs().sum() > 0 and students[1].fc.weight.grad is None
    assert torch.allclose(losses[0], cross_entropies[0] + kls[0]) and kls[0] > 0
