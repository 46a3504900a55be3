"""Train task: fine-tune one SuPreM backbone on the datastore's final labels, then publish atomically."""

from __future__ import annotations

import logging
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader, partition_dataset
from monai.handlers import from_engine
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.losses import DiceLoss
from monai.transforms import Activationsd, AsDiscreted, Compose
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from lib.classes import CLASS_INDEX
from lib.config import PSEUDO_WEIGHT, TRAIN_AMP, TRAIN_EPOCHS, TRAIN_NUM_SAMPLES, VAL_FRACTION
from lib.networks import build_network, load_checkpoint, save_checkpoint
from lib.trainers.split import persistent_split
from lib.transforms.cache import open_cache
from lib.transforms.recipe import AMP_DTYPES, AMP_MODES, Recipe, training_transforms
from lib.weights import WeightsRegistry
from lib.files import file_version, write_json_atomic
from lib.stopping import check_stop

logger = logging.getLogger(__name__)


REVISED_KEY = "revised"  # per sample: 1.0 per organ channel revised in that image, 0.0 per pseudo label
# Checkpoint names given to MONAI Label's train task (its defaults, named here so publishing can find them).
FINAL_CHECKPOINT, BEST_CHECKPOINT, MODEL_KEY = "checkpoint_final.pt", "model.pt", "model"


class MaskedChannelLoss(torch.nn.Module):
    """Sigmoid BCE + Dice per channel on the network output channels of the app's classes, each sample's
    channels weighted: 1 for organs revised in that image, ``pseudo_weight`` for the others (their
    labels are the model's own), as a weighted mean over samples and channels.

    ``revised`` (B, C) is set for each batch by ``masked_iteration``; without it (or with every organ
    revised) the value is MONAI's sigmoid ``DiceLoss`` plus BCE with logits, each averaged over samples
    and channels. (MONAI's ``DiceCELoss``, used before, silently takes softmax cross-entropy whenever
    there is more than one channel, which does not fit independent organ channels.)
    """

    def __init__(self, channels: Sequence[int], pseudo_weight: float = PSEUDO_WEIGHT):
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


def fine_tuning_loss(channels: Sequence[int], pseudo_weight: float = PSEUDO_WEIGHT) -> MaskedChannelLoss:
    """The train task's loss: sigmoid BCE + Dice on the network output ``channels`` (0-based, the app's
    classes), organs nobody revised weighted ``pseudo_weight``."""
    return MaskedChannelLoss(channels, pseudo_weight)


def fine_tuning_optimizer(network: torch.nn.Module, lr: float = LEARNING_RATE) -> torch.optim.Optimizer:
    """The train task's optimizer over ``network``'s parameters."""
    return torch.optim.AdamW(network.parameters(), lr=float(lr), weight_decay=WEIGHT_DECAY)


class RevisedChannels:
    """Train handler: before each iteration hands the batch's revised-organ mask (``REVISED_KEY``, (B, C))
    to the loss (``MaskedChannelLoss.revised``), and takes it back after."""

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self.hand_over)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.take_back)

    @staticmethod
    def hand_over(engine) -> None:
        batch = engine.state.batch
        revised = batch.get(REVISED_KEY) if isinstance(batch, dict) else None
        engine.loss_function.revised = None if revised is None else torch.as_tensor(revised).to(engine.state.device)

    @staticmethod
    def take_back(engine) -> None:
        engine.loss_function.revised = None


class AutocastDtype:
    """Train handler: the autocast dtype of MONAI's ``SupervisedTrainer`` (``amp_kwargs``), which MONAI
    Label's train task leaves at fp16."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def attach(self, engine) -> None:
        engine.amp_kwargs = {**(getattr(engine, "amp_kwargs", None) or {}), "dtype": self.dtype}


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
        max_epochs: int = TRAIN_EPOCHS,
        num_samples: int = TRAIN_NUM_SAMPLES,
        lr: float = LEARNING_RATE,
        val_fraction: float = VAL_FRACTION,
        label_map: Optional[Dict[int, int]] = None,
        description: str = "",
        publish_to: Optional[str] = None,
        amp: str = TRAIN_AMP,
        cache_dir: Optional[str] = None,
        gpus: str = "all",
        pseudo_weight: float = PSEUDO_WEIGHT,
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
        self.train_dir = os.path.join(model_dir, f"train_{backbone}")  # one run folder per request name
        super().__init__(
            model_dir=self.train_dir,
            description=description or f"Fine-tune SuPreM {backbone} on final labels",
            config=config,
            # Mixed precision where it pays: on a GPU (torch.autocast("cuda")); fp32 on the CPU.
            amp=torch.cuda.is_available() and amp != "none",
            publish_path=None,  # published by _publish, atomically, once training has finished
            stats_path=os.path.join(model_dir, f"train_{backbone}_stats.json"),
            labels={n: CLASS_INDEX[n] for n in self.label_names},
            final_filename=FINAL_CHECKPOINT,
            key_metric_filename=BEST_CHECKPOINT,
            model_dict_key=MODEL_KEY,
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

    def train_handlers(self, context: Context):
        handlers = super().train_handlers(context) + [RevisedChannels()]
        return handlers + ([AutocastDtype(self.amp_dtype)] if self.amp_dtype is not None else [])

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
            num_samples=int(context.request.get("num_samples", TRAIN_NUM_SAMPLES)),
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
        # Validate as the infer task predicts: the recipe's window (not the training crop), overlap and blending.
        r = self.recipe
        return SlidingWindowInferer(roi_size=r.roi, sw_batch_size=r.sw_batch_size, overlap=r.overlap, mode=r.blend)

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

    def train_data_loader(self, context, num_workers=0, shuffle=True):
        dataset, datalist = self.dataset(context, context.train_datalist, is_train=True)
        logger.info(f"{self.backbone}: {len(datalist)} training records")
        return DataLoader(dataset, batch_size=context.train_batch_size, shuffle=shuffle, num_workers=num_workers)

    def val_data_loader(self, context, num_workers=0):
        dataset, datalist = self.dataset(context, context.val_datalist, is_train=False)
        logger.info(f"{self.backbone}: {len(datalist)} validation records")
        return DataLoader(dataset, batch_size=context.val_batch_size, shuffle=False, num_workers=num_workers)

    def dataset(self, context, datalist: List[Dict], is_train: bool):
        """(dataset, datalist) of this process: its share of ``datalist`` under several GPUs, pre-processed
        in memory (MONAI's ``CacheDataset``) or, with ``cache_dir``, on disk and kept across rounds."""
        if context.multi_gpu:  # each rank takes its share, as MONAI Label's own loaders do
            world_size = torch.distributed.get_world_size()
            if len(datalist) // world_size:
                datalist = partition_dataset(data=datalist, num_partitions=world_size, even_divisible=True)[
                    context.local_rank
                ]
        transforms = Compose(self.train_pre_transforms(context) if is_train else self.val_pre_transforms(context))
        if not self.cache_dir:
            return CacheDataset(datalist, transforms), datalist
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

    def load_path(self, output_dir, pretrained=True):
        return None  # weights are loaded in network() with the safe loader; MONAI Label then loads none

    # --- run, then publish ----------------------------------------------------------------------------
    def __call__(self, request, datastore: Datastore):
        start = time.time()
        datalist = datastore.datalist()
        if not datalist:
            raise ValueError("no final labels to train on")
        if {**self.config(), **request}.get("multi_gpu"):
            # torch.distributed's env:// rendezvous; MONAI Label sets these only for its own child processes.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        result = super().__call__(request, datastore)
        result = dict(result or {})
        check_stop(f"{self.backbone}: not published, the previous model stays")  # a stop cut training short
        labelled = self.pre_process(request, datastore)
        result["revised_images"], result["val_revised_images"] = self._revision_counts(labelled)
        result["validation_images"] = len(persistent_split(labelled, self.split_file, self.val_fraction)[1])
        published = self._publish(request, result, n_labels=len(datalist), seconds=time.time() - start)
        result["published"] = published
        return result

    def _revision_counts(self, datalist: List[Dict]):
        """({organ: labelled images with it revised}, {organ: validation images with it revised})."""
        _, val = persistent_split(datalist, self.split_file, self.val_fraction)

        def count(items):
            return {n: int(sum(d[REVISED_KEY][c] for d in items)) for c, n in enumerate(self.label_names)}

        return count(datalist), count(val)

    def _best_checkpoint(self, name: str, validated: bool) -> Optional[str]:
        """The checkpoint to publish: the best on validation when there was a validation split; else the
        last (without one, MONAI Label keeps the best *training-crop* Dice, which selects nothing)."""
        out = os.path.join(self.train_dir, name)
        order = (BEST_CHECKPOINT, FINAL_CHECKPOINT) if validated else (FINAL_CHECKPOINT, BEST_CHECKPOINT)
        for f in order:
            p = os.path.join(out, f)
            if os.path.exists(p):
                return p
        return None

    def _publish(self, request: Dict, result: Dict, n_labels: int, seconds: float) -> Optional[str]:
        name = {**self.config(), **request}.get("name", "train_01")
        src = self._best_checkpoint(name, validated=result.get("validation_images", 0) > 0)
        if src is None:
            raise RuntimeError(f"{self.backbone}: training produced no checkpoint; the previous model stays")
        state = torch.load(src, map_location="cpu", weights_only=True)
        state = state.get(MODEL_KEY, state) if isinstance(state, dict) else state
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
