from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from selfsup.errors import ConfigError, SelfSupError
from selfsup.methods.base import Batch, Method, MethodContext, StepOutput, register_method


@register_method
class Supervised(Method):
    """Cross-entropy baseline of SupCon (Khosla et al. 2020, "Supervised Contrastive Learning",
    the "SupCE" of the SupContrast reference): a linear classifier on the backbone, trained with
    the backbone by cross-entropy on the labels of one augmented view.

    It trains under the same trainer, data, backbone and budget as any other method, so it is the
    supervised reference point of the kNN and linear evaluations. It uses SupCon's augmentation,
    so that beside ``supcon`` only the loss differs (the reference's CE run used crop and flip
    only). Needs labelled data; unlabelled samples (label < 0) are left out of the loss.
    """

    name = "supervised"
    views = "supcon"
    num_views = 1
    # The reference's CE setting (SupContrast README): SGD, lr 0.8 at batch 1024 (0.2 per 256
    # images), momentum 0.9, weight decay 1e-4, cosine.
    default_optimizer = {"name": "sgd", "lr": 0.2, "lr_scaling": "linear", "weight_decay": 1e-4,
                         "momentum": 0.9, "warmup_epochs": 0}

    def __init__(self, backbone: nn.Module, context: MethodContext) -> None:
        super().__init__(backbone, context)
        if context.num_classes < 1:
            raise ConfigError("method=supervised needs labelled data (the data has no classes)")
        self.classifier = nn.Linear(context.feature_dim, context.num_classes)

    def training_step(self, batch: Batch) -> StepOutput:
        if batch.labels is None:
            raise SelfSupError("method=supervised needs labels, and the batch has none")
        (view,) = batch.views
        features = self.backbone(view)
        logits = self.classifier(features)
        labelled = batch.labels >= 0
        if not labelled.any():
            # Attached to the graph, so backward runs and every gradient is 0.
            return StepOutput(logits.sum() * 0.0, features=features, embeddings=[logits])
        logits_labelled, labels = logits[labelled], batch.labels[labelled]
        loss = F.cross_entropy(logits_labelled, labels)
        top1 = (logits_labelled.argmax(1) == labels).float().mean()
        return StepOutput(loss, logs={"top1": top1.detach()}, features=features,
                          embeddings=[logits])
