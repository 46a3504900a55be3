"""Training on partly revised labels (CPU): only revised organs give gradient, validation counts them only."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, list_data_collate
from monai.engines import SupervisedTrainer
from monai.losses import DiceLoss
from monai.transforms import Compose
from monailabel.tasks.train.basic_train import Context

from lib.classes import CLASS_INDEX, LABEL_SETS
from lib.config import parse_conf
from testing.phantoms import make_phantom, write_phantom
from lib.datastore import CheckedLocalDatastore
from lib.networks import build_network, load_checkpoint
from lib.trainers.round import run_round
from lib.trainers.segmentation import MaskedChannelLoss, RevisedChannels, SuPreMTrainer
from lib.transforms.recipe import PRESETS
from support import synthetic_registry

ORGANS = LABEL_SETS["atlas25"]
LIVER, PANCREAS = CLASS_INDEX["liver"], CLASS_INDEX["pancreas"]


def _datastore(tmp_path, seeds, revised, wrong_liver=False):
    """Phantoms whose final labels were saved through the checked datastore, naming ``revised``."""
    studies = tmp_path / "studies"
    ds = None
    for s in seeds:
        phantom = make_phantom(s, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0))
        write_phantom(phantom, str(studies), f"ph_{s}", None)
        label = np.asarray(phantom.label, np.uint8).copy()
        if wrong_liver:  # a liver where there is none: a pseudo label the model must not learn
            label[label == LIVER] = 0
            label[2:14, 2:14, 2:10] = LIVER
        path = tmp_path / f"label_{s}.nii.gz"
        nib.save(nib.Nifti1Image(label, phantom.affine), str(path))
        ds = ds or CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"], allowed_labels=range(1, 26))
        ds.refresh()
        ds.save_label(f"ph_{s}", str(path), "final", {"revised": revised, "client_id": "t"})
    return ds


def _trainer(tmp_path, registry, pseudo_weight=0.0, epochs=1):
    return SuPreMTrainer(
        "segresnet",
        registry,
        ORGANS,
        PRESETS["recipe"],
        model_dir=str(tmp_path / "train"),
        split_file=str(tmp_path / "split.json"),
        roi=(32, 32, 32),
        max_epochs=epochs,
        num_samples=1,
        val_fraction=0.5,
        pseudo_weight=pseudo_weight,
    )


def _output_grad_per_channel(tmp_path, registry, ds, pseudo_weight):
    """One real SupervisedTrainer step (the trainer's datalist, transforms, loss and iteration) ->
    |gradient| of the last layer's weights per output channel."""
    task = _trainer(tmp_path, registry, pseudo_weight)
    context = Context()
    context.request = {"num_samples": 1}
    context.events_dir = str(tmp_path / "events")  # the train handlers' TensorBoard folder
    datalist = task.pre_process({}, ds)
    loader = DataLoader(Dataset(datalist, Compose(task.train_pre_transforms(context))), batch_size=1, collate_fn=list_data_collate)
    net = build_network("segresnet")
    load_checkpoint(net, registry.current_path("segresnet"))
    last = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.out_channels == 32][-1]
    engine = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
        loss_function=task.loss_function(context),
        inferer=task.train_inferer(context),
        train_handlers=[h for h in task.train_handlers(context) if isinstance(h, RevisedChannels)],
    )
    engine.run()
    return last.weight.grad.abs().flatten(1).sum(1), datalist


def test_an_unrevised_wrong_channel_gets_no_gradient_and_a_revised_one_does(tmp_path):
    registry = synthetic_registry(tmp_path)
    ds = _datastore(tmp_path, [11], revised=["pancreas"], wrong_liver=True)
    grad, datalist = _output_grad_per_channel(tmp_path, registry, ds, pseudo_weight=0.0)
    assert datalist[0]["revised"] == [1.0 if n == "pancreas" else 0.0 for n in ORGANS]
    assert float(grad[LIVER - 1]) == 0.0, "the wrong, unrevised liver must not teach the model"
    assert float(grad[PANCREAS - 1]) > 0.0
    assert all(float(grad[CLASS_INDEX[n] - 1]) == 0.0 for n in ORGANS if n != "pancreas")
    # With pseudo_weight > 0 the pseudo labels teach too: the app's default (--conf pseudo_weight not
    # given) trains every channel of the assembled label, as AbdomenAtlas does.
    grad, _ = _output_grad_per_channel(tmp_path, registry, ds, pseudo_weight=parse_conf({}).pseudo_weight)
    assert float(grad[LIVER - 1]) > 0.0 and float(grad[PANCREAS - 1]) > 0.0


def test_whole_volume_labels_train_on_sigmoid_bce_plus_dice_over_every_channel():
    torch.manual_seed(0)
    channels = [CLASS_INDEX[n] - 1 for n in ORGANS]
    logits = torch.randn(2, 32, 12, 12, 12)
    target = (torch.rand(2, len(channels), 12, 12, 12) > 0.7).float()
    # MONAI's sigmoid Dice plus torch's BCE with logits, both averaged over batch and channels. (MONAI's
    # DiceCELoss, used before, takes softmax cross-entropy whenever there is more than one channel.)
    x = logits[:, channels]
    before = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)(x, target) + torch.nn.BCEWithLogitsLoss()(x, target)
    loss = MaskedChannelLoss(channels, pseudo_weight=0.3)
    assert torch.allclose(loss(logits, target), before, atol=1e-6)
    loss.revised = torch.ones(2, len(channels))
    assert torch.allclose(loss(logits, target), before, atol=1e-6)
    loss.revised[0, 3] = 0.0  # one organ not revised in one image: the loss changes
    assert not torch.allclose(loss(logits, target), before, atol=1e-6)


def test_a_round_on_partial_labels_validates_revised_organs_only_and_says_on_how_many(tmp_path):
    registry = synthetic_registry(tmp_path)
    ds = _datastore(tmp_path, [22, 24, 26], revised=["liver", "spleen"])  # ph_24 validates
    task = _trainer(tmp_path, registry)
    fields = run_round({"round": 1}, {"segresnet": task}, None, ds, ORGANS)
    assert fields["val_revised_images"] == {n: int(n in ("liver", "spleen")) for n in ORGANS}
    assert fields["revised_images"]["liver"] == 3 and fields["revised_images"]["pancreas"] == 0
    dice = fields["dice"]["segresnet"]
    assert set(o for o, v in dice.items() if v is not None) == {"liver", "spleen"}
    assert all(0.0 <= dice[o] <= 1.0 for o in ("liver", "spleen"))
    # The validation mean is over the revised organs only (the pseudo organs of the label left out).
    assert fields["mean_dice"]["segresnet"] == pytest.approx((dice["liver"] + dice["spleen"]) / 2, abs=2e-4)


@pytest.fixture(autouse=True)
def _cpu_only(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
