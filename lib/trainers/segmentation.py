"""Train task: fine-tune one SuPreM backbone on the datastore's final labels, then publish atomically."""

from __future__ import annotations

import logging
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
from monai.data import partition_dataset
from monai.handlers import from_engine
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.losses import DiceLoss
from monai.transforms import Activationsd, AsDiscreted
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from lib.classes import CLASS_INDEX
from lib.networks import build_network, load_checkpoint, save_checkpoint
from lib.trainers.split import persistent_split
from lib.transforms.cache import open_cache
from lib.transforms.recipe import AMP_DTYPES, AMP_MODES, Recipe, training_transforms
from lib.weights import WeightsRegistry
from lib.files import file_version, write_json_atomic
from lib.stopping import check_stop

logger = logging.getLogger(__name__)


REVISED_KEY = "revised"  # per sample: 1.0 per organ channel revised in that image, 0.0 per pseudo label


class MaskedChannelLoss(torch.nn.Module):
    """Sigmoid BCE + Dice per channel on the network output channels of the app's classes, each sample's
    channels weighted: 1 for organs revised in that image, ``pseudo_weight`` for the others (their
    labels are the model's own), as a weighted mean over samples and channels.

    ``revised`` (B, C) is set for each batch by ``masked_iteration``; without it (or with every organ
    revised) the value is MONAI's sigmoid ``DiceLoss`` plus BCE with logits, each averaged over samples
    and channels. (MONAI's ``DiceCELoss``, used before, silently takes softmax cross-entropy whenever
    there is more than one channel, which does not fit independent organ channels.)
    """

    def __init__(self, channels: Sequence[int], pseudo_weight: float = 0.0):
        super().__init__()
        self.channels = list(channels)
        self.pseudo_weight = float(pseudo_weight)
        self.dice = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, reduction="none")
        self.revised: Optional[torch.Tensor] = None

    def forward(self, logits, target):
        logits = logits[:, self.channels]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        per_channel = self.dice(logits, target).flatten(1) + bce.flatten(2).mean(2)  # (B, C)
        if self.revised is None:
            return per_channel.mean()
        revised = torch.as_tensor(self.revised).to(per_channel).reshape(per_channel.shape)
        weight = revised + self.pseudo_weight * (1.0 - revised)
        return (per_channel * weight).sum() / weight.sum().clamp_min(1e-12)


# AdamW as SuPreM fine-tunes: the learning rate a train request may override, and a light weight decay.
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 1e-5


def fine_tuning_loss(channels: Sequence[int], pseudo_weight: float = 0.0) -> MaskedChannelLoss:
    """The train task's loss: sigmoid BCE + Dice on the network output ``channels`` (0-based, the app's
    classes), organs nobody revised weighted ``pseudo_weight``."""
    return MaskedChannelLoss(channels, pseudo_weight)


def fine_tuning_optimizer(network: torch.nn.Module, lr: float = LEARNING_RATE) -> torch.optim.Optimizer:
    """The train task's optimizer over ``network``'s parameters."""
    return torch.optim.AdamW(network.parameters(), lr=float(lr), weight_decay=WEIGHT_DECAY)


def masked_iteration(engine, batchdata):
    """SupervisedTrainer's iteration, with the batch's revised-organ mask handed to the loss first."""
    revised = batchdata.get(REVISED_KEY) if isinstance(batchdata, dict) else None
    engine.loss_function.revised = None if revised is None else torch.as_tensor(revised).to(engine.state.device)
    try:
        return engine._iteration(engine, batchdata)
    finally:
        engine.loss_function.revised = None


class SuPreMTrainer(BasicTrainTask):
    """Fine-tunes ``backbone`` (all 32 released output channels kept, loss on the app's label set).

    Starts from the model the infer task serves now (released, starter or last fine-tuned weights),
    trains with sigmoid BCE + Dice, AdamW, random foreground-biased crops and the SuPreM
    pre-processing, then writes the best model in the released format to the registry's published
    path through a temporary file and a rename. A failed or stopped training leaves the old model.
    """

    def __init__(
        self,
        backbone: str,
        registry: WeightsRegistry,
        labels: Sequence[str],
        recipe: Recipe,
        model_dir: str,
        split_file: str,
        roi: Optional[Sequence[int]] = None,
        max_epochs: int = 50,
        num_samples: int = 2,
        lr: float = LEARNING_RATE,
        val_fraction: float = 0.2,
        label_map: Optional[Dict[int, int]] = None,
        description: str = "",
        publish_to: Optional[str] = None,
        amp: str = "bf16",
        cache_dir: Optional[str] = None,
        gpus: str = "all",
        pseudo_weight: float = 0.0,
    ):
        self.backbone = backbone
        self.registry = registry
        self.label_names = list(labels)
        self.class_indices = [CLASS_INDEX[n] for n in self.label_names]
        self.channels = [i - 1 for i in self.class_indices]
        self.recipe = recipe
        self.split_file = split_file
        # Train on crops of the window inference slides, so the model sees what the infer task shows it.
        self.roi = tuple(int(r) for r in (roi or recipe.roi))
        self.label_map = label_map
        self.val_fraction = val_fraction
        # Loss weight of organs nobody revised in an image (their labels are pseudo labels); 0: no gradient.
        self.pseudo_weight = float(pseudo_weight)
        # Pre-processed (resampled) volumes kept on disk across rounds and backbones (None: in memory only).
        self.cache_dir = cache_dir
        self.publish_to = publish_to or registry.published_path(backbone)
        if amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}; got {amp!r}")
        self.amp_dtype = AMP_DTYPES.get(amp)
        config = {
            "max_epochs": max_epochs,
            "num_samples": num_samples,
            "lr": lr,
            "roi": ",".join(str(r) for r in self.roi),
            # Several GPUs: MONAI Label's DDP (one process per GPU, torch.distributed with NCCL).
            "multi_gpu": torch.cuda.device_count() > 1 and gpus != "0",
            "gpus": gpus,
            # Caches the deterministic part (load, resample, window) so epochs do not redo it.
            "dataset": "CacheDataset",
            "dataloader": "DataLoader",
            "tracking": "None",
        }
        super().__init__(
            model_dir=os.path.join(model_dir, f"train_{backbone}"),
            description=description or f"Fine-tune SuPreM {backbone} on final labels",
            config=config,
            # Mixed precision where it pays: on a GPU (torch.autocast("cuda")); fp32 on the CPU.
            amp=torch.cuda.is_available() and amp != "none",
            publish_path=None,  # published by _publish, atomically, once training has finished
            stats_path=os.path.join(model_dir, f"train_{backbone}_stats.json"),
            labels={n: CLASS_INDEX[n] for n in self.label_names},
        )

    # --- request values -------------------------------------------------------------------------------
    def _roi(self, context: Context):
        roi = context.request.get("roi", self.roi)
        if isinstance(roi, str):
            roi = [int(r) for r in roi.split(",")]
        roi = list(roi) * 3 if len(roi) == 1 else list(roi)
        return tuple(int(r) for r in roi)

    # --- what MONAI Label asks of a train task --------------------------------------------------------
    def network(self, context: Context):
        net = build_network(self.backbone)
        start = self.registry.current_path(self.backbone)
        if start:
            load_checkpoint(net, start)
            logger.info(f"{self.backbone}: fine-tuning from {start}")
        else:
            logger.warning(f"{self.backbone}: no weights to start from; training from scratch")
        context.start_model = start
        return net

    def optimizer(self, context: Context):
        return fine_tuning_optimizer(context.network, context.request.get("lr", LEARNING_RATE))

    def loss_function(self, context: Context):
        return fine_tuning_loss(self.channels, self.pseudo_weight)

    def train_iteration_update(self, context: Context):
        return masked_iteration

    def lr_scheduler_handler(self, context: Context):
        return None

    def pre_process(self, request, datastore: Datastore):
        """The datastore's image/label pairs, each with its channel mask (``REVISED_KEY``): the organs
        revised in that label (every organ where the datastore keeps no organ records)."""
        datalist = []
        pairs = datastore.datalist()
        revised_by_image = getattr(datastore, "revised_by_image", dict)()  # after datalist: it covers every pair
        for item in pairs:
            item = dict(item)
            revised = revised_by_image.get(os.path.realpath(item["image"]))
            revised = set(self.label_names if revised is None else revised)
            item[REVISED_KEY] = [1.0 if n in revised else 0.0 for n in self.label_names]
            datalist.append(item)
        return datalist

    def train_pre_transforms(self, context: Context):
        return training_transforms(
            self.recipe,
            self.class_indices,
            self._roi(context),
            num_samples=int(context.request.get("num_samples", 2)),
            label_map=self.label_map,
        ) + [_ChannelMaskd(REVISED_KEY)]

    def train_post_transforms(self, context: Context):
        return [
            _SelectChannelsd(keys="pred", channels=self.channels),
            Activationsd(keys="pred", sigmoid=True),
            AsDiscreted(keys="pred", threshold=0.5),
            # Dice of an organ only where it was revised: an empty label channel gives MONAI's Dice NaN,
            # which its means leave out.
            _ClearUnrevisedd(keys="label", mask_key=REVISED_KEY),
        ]

    def val_pre_transforms(self, context: Context):
        pre = training_transforms(self.recipe, self.class_indices, self._roi(context), augment=False, label_map=self.label_map)
        return pre + [_ChannelMaskd(REVISED_KEY)]

    def val_post_transforms(self, context: Context):
        return self.train_post_transforms(context)

    def train_inferer(self, context: Context):
        return SimpleInferer()

    def val_inferer(self, context: Context):
        # Validate as the infer task predicts: the recipe's window, not the (smaller) training crop.
        return SlidingWindowInferer(roi_size=self.recipe.roi, sw_batch_size=1, overlap=0.25, mode="gaussian")

    def train_key_metric(self, context: Context):
        from monai.handlers import MeanDice

        return {"train_mean_dice": MeanDice(output_transform=from_engine(["pred", "label"]), include_background=True)}

    def val_key_metric(self, context: Context):
        from monai.handlers import MeanDice

        return {"val_mean_dice": MeanDice(output_transform=from_engine(["pred", "label"]), include_background=True)}

    def val_additional_metrics(self, context: Context):
        from monai.handlers import MeanDice

        # Per-organ Dice, recorded in the round log.
        return {
            "val_dice_per_organ": MeanDice(
                output_transform=from_engine(["pred", "label"]), include_background=True, reduction="mean_batch"
            )
        }

    def _dataset(self, context, datalist, is_train, replace_rate=0.25):
        if not self.cache_dir:
            return super()._dataset(context, datalist, is_train, replace_rate)
        if context.multi_gpu:  # each rank takes its share, as MONAI Label's own _dataset does
            world_size = torch.distributed.get_world_size()
            if len(datalist) // world_size:
                datalist = partition_dataset(data=datalist, num_partitions=world_size, even_divisible=True)[
                    context.local_rank
                ]
        pre = self.train_pre_transforms(context) if is_train else self.val_pre_transforms(context)
        transforms = self._validate_transforms(pre, "Training" if is_train else "Validation", "pre")
        cache = open_cache(
            self.cache_dir,
            "train" if is_train else "val",
            self.recipe.preprocessing_key(),
            roi=list(self._roi(context)),
            classes=self.class_indices,
            label_map=self.label_map,
        )
        return cache.dataset(datalist, transforms), datalist

    def partition_datalist(self, context: Context, shuffle=False):
        train, val = persistent_split(context.datalist, self.split_file, self.val_fraction)
        logger.info(f"{self.backbone}: {len(train)} training and {len(val)} validation images (kept split)")
        return train, val

    def _create_trainer(self, context: Context):
        trainer = super()._create_trainer(context)
        if self.amp_dtype is not None:
            trainer.amp_kwargs = {"dtype": self.amp_dtype}  # BasicTrainTask only offers fp16
        return trainer

    def _load_checkpoint(self, context, train_handlers):
        pass  # weights are loaded in network() with the safe loader

    def load_path(self, output_dir, pretrained=True):
        return None

    # --- run, then publish ----------------------------------------------------------------------------
    def __call__(self, request, datastore: Datastore):
        start = time.time()
        datalist = datastore.datalist()
        if not datalist:
            raise ValueError("no final labels to train on")
        if {**self._config, **request}.get("multi_gpu"):
            # torch.distributed's env:// rendezvous; MONAI Label sets these only for its own child processes.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        result = super().__call__(request, datastore)
        result = dict(result or {})
        check_stop(f"{self.backbone}: not published, the previous model stays")  # a stop cut training short
        result["revised_images"], result["val_revised_images"] = self._revision_counts(self.pre_process(request, datastore))
        published = self._publish(request, result, n_labels=len(datalist), seconds=time.time() - start)
        result["published"] = published
        return result

    def _revision_counts(self, datalist: List[Dict]):
        """({organ: labelled images with it revised}, {organ: validation images with it revised})."""
        _, val = persistent_split(datalist, self.split_file, self.val_fraction)

        def count(items):
            return {n: int(sum(d[REVISED_KEY][c] for d in items)) for c, n in enumerate(self.label_names)}

        return count(datalist), count(val)

    def _best_checkpoint(self, name: str) -> Optional[str]:
        out = os.path.join(self._model_dir, name)
        for f in (self._key_metric_filename, self._final_filename):
            p = os.path.join(out, f)
            if os.path.exists(p):
                return p
        return None

    def _publish(self, request: Dict, result: Dict, n_labels: int, seconds: float) -> Optional[str]:
        name = {**self._config, **request}.get("name", "train_01")
        src = self._best_checkpoint(name)
        if src is None:
            raise RuntimeError(f"{self.backbone}: training produced no checkpoint; the previous model stays")
        state = torch.load(src, map_location="cpu", weights_only=True)
        state = state.get(self._model_dict_key, state) if isinstance(state, dict) else state
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        net = build_network(self.backbone)
        net.load_state_dict(state, strict=True)
        dest = self.publish_to
        base = self.registry.current_path(self.backbone)
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        save_checkpoint(net, dest)
        write_json_atomic(
            dest + ".json",
            {
                "source": request.get("source", "fine-tuned"),
                "trained_from": base,
                "trained_from_version": file_version(base) if base and os.path.exists(base) else None,
                "labels_used": n_labels,
                "round": request.get("round"),
                "seconds": round(seconds, 1),
                "best_metric": result.get("best_metric"),
                "published_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
        logger.info(f"{self.backbone}: published {dest} (version {file_version(dest)})")
        return dest


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _SelectChannelsd:
    """Keep the app's channels of the prediction so metrics compare like with like."""

    def __init__(self, keys: str, channels: List[int]):
        self.keys = keys
        self.channels = channels

    def __call__(self, data):
        d = dict(data)
        d[self.keys] = d[self.keys][self.channels]
        return d


class _ChannelMaskd:
    """The datalist's channel mask (a list) as a float tensor (C,), which batches to (B, C)."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, data):
        d = dict(data)
        if self.key in d:
            d[self.key] = torch.as_tensor(d[self.key], dtype=torch.float32)
        return d


class _ClearUnrevisedd:
    """Empty the label channels of organs not revised in the image (mask value 0)."""

    def __init__(self, keys: str, mask_key: str):
        self.keys = keys
        self.mask_key = mask_key

    def __call__(self, data):
        d = dict(data)
        mask = d.get(self.mask_key)
        if mask is not None:
            keep = torch.as_tensor(mask).to(d[self.keys].device).reshape(-1, *([1] * (d[self.keys].ndim - 1)))
            d[self.keys] = d[self.keys] * (keep > 0)
        return d
