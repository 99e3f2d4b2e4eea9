"""The zoo: real torchvision and timm trunks (stem and early stages to total stride 8), built with
random weights (no download), for ``python -m suites.zoo``.

Rule Z1. A timm trunk is the model's own feature extractor cut at its deepest feature of reduction
         <= 8 (``timm.models.FeatureListNet`` with that one ``out_index``): the modules the model
         runs up to there, as the model runs them (a model whose extractor collects features with
         forward hooks, which do not fire under torch.fx, uses timm's ``forward_intermediates``
         extractor, ``feature_cls="getter"``). A torchvision trunk is the prefix of the model's
         own modules named in ``TORCHVISION`` (the stages to stride 8).
Rule Z2. Every model is built with ``pretrained=False`` / ``weights=None`` and seed 0; BatchNorm and
         LayerNorm get random statistics and affine parameters (``suites/trunks.py`` Rules T1-T3).
Rule Z3. ``expect`` is what a reader of the model's code expects: ``"exact"`` when every layer in
         the trunk is local; ``"exact (statistics: <kind>)"`` when it also holds statistics over
         the whole map that stream in passes (squeeze-excite's global pool, split attention,
         GRN, GroupNorm: reductions Rules R1-R5); else the name of the genuinely non-local layer
         type it contains (attention). The run checks it (run.py Rule Z5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from suites.trunks import (
    RESNET,
    THREE_D,
    timm_trunk,
    torchvision_model,
    torchvision_trunk,
    tv_features,
    tv_layers,
)


@dataclass(frozen=True)
class ZooModel:
    """One trunk of the zoo: its name, library, family, and what a reader expects (Rule Z3)."""

    name: str
    library: str  # "timm" or "torchvision"
    family: str
    expect: str  # "exact", or the non-local layer the trunk contains
    build: Callable[[], nn.Module]
    spatial_axes: int = 2
    # Rule Z6's input shape and tile, where the trunk needs its own (None: derived)
    shape_and_tile: tuple[tuple[int, ...], tuple[int, ...]] | None = None


_RESNET = RESNET[:6]
_VIDEO = ["stem", "layer1", "layer2"]

# torchvision: (name, family, expect, builder)
TORCHVISION: list[tuple[str, str, str, Callable[[], nn.Module]]] = [
    ("resnet18", "resnet", "exact", lambda: torchvision_trunk("resnet18", _RESNET)),
    ("resnet50", "resnet", "exact", lambda: torchvision_trunk("resnet50", _RESNET)),
    ("resnext50_32x4d", "resnet", "exact", lambda: torchvision_trunk("resnext50_32x4d", _RESNET)),
    ("wide_resnet50_2", "resnet", "exact", lambda: torchvision_trunk("wide_resnet50_2", _RESNET)),
    ("vgg11_bn", "vgg", "exact", lambda: tv_features("vgg11_bn", 15)),
    ("alexnet", "alexnet", "exact", lambda: tv_features("alexnet", 6)),
    ("mobilenet_v2", "mobilenet", "exact", lambda: tv_features("mobilenet_v2", 7)),
    ("mobilenet_v3_large", "mobilenet", "exact (statistics: squeeze-excite)", lambda: tv_features("mobilenet_v3_large", 7)),
    ("efficientnet_b0", "efficientnet", "exact (statistics: squeeze-excite)", lambda: tv_features("efficientnet_b0", 4)),
    ("densenet121", "densenet", "exact", lambda: tv_features("densenet121", 8)),
    ("squeezenet1_1", "squeezenet", "exact", lambda: tv_features("squeezenet1_1", 8)),
    ("convnext_tiny", "convnext", "exact", lambda: tv_features("convnext_tiny", 4)),
    ("regnet_x_400mf", "regnet", "exact", lambda: torchvision_trunk("regnet_x_400mf", ["stem", "trunk_output.block1", "trunk_output.block2"])),
    ("regnet_y_400mf", "regnet", "exact (statistics: squeeze-excite)", lambda: torchvision_trunk("regnet_y_400mf", ["stem", "trunk_output.block1", "trunk_output.block2"])),
    ("shufflenet_v2_x1_0", "shufflenet", "exact", lambda: torchvision_trunk("shufflenet_v2_x1_0", ["conv1", "maxpool", "stage2"])),
    ("mnasnet1_0", "mnasnet", "exact", lambda: tv_layers("mnasnet1_0", 10)),
    ("googlenet", "inception", "exact", lambda: torchvision_trunk("googlenet", ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b"], aux_logits=False, init_weights=False)),
    ("inception_v3", "inception", "exact", lambda: torchvision_trunk("inception_v3", ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2", "Mixed_5b"], aux_logits=False, init_weights=False)),
    ("swin_t", "swin", "attention", lambda: tv_features("swin_t", 4)),
    ("r3d_18", "video", "exact", lambda: torchvision_trunk("r3d_18", _VIDEO)),
    ("mc3_18", "video", "exact", lambda: torchvision_trunk("mc3_18", _VIDEO)),
    ("r2plus1d_18", "video", "exact", lambda: torchvision_trunk("r2plus1d_18", _VIDEO)),
]  # fmt: skip

# timm: (name, family, expect)
TIMM: list[tuple[str, str, str]] = [
    ("resnet18", "resnet", "exact"),
    ("resnet26d", "resnet", "exact"),
    ("resnet10t", "resnet", "exact"),
    ("resnetblur18", "resnet", "exact"),
    ("seresnet18", "resnet", "exact (statistics: squeeze-excite)"),
    ("ecaresnet26t", "resnet", "exact (statistics: squeeze-excite)"),
    ("skresnet18", "resnet", "exact (statistics: squeeze-excite)"),
    ("resnest14d", "resnet", "exact (statistics: split attention)"),
    ("res2net50_14w_8s", "res2net", "exact"),
    ("res2next50", "res2net", "exact"),
    ("cspresnet50", "csp", "exact"),
    ("cspdarknet53", "csp", "exact"),
    ("cs3darknet_s", "csp", "exact"),
    ("darknet53", "darknet", "exact"),
    ("dla34", "dla", "exact"),
    ("dpn68", "dpn", "exact"),
    ("densenet121", "densenet", "exact"),
    ("vgg11", "vgg", "exact"),
    ("mobilenetv2_100", "mobilenet", "exact"),
    ("mobilenetv3_small_100", "mobilenet", "exact (statistics: squeeze-excite)"),
    ("mobilenetv4_conv_small", "mobilenet", "exact"),
    ("lcnet_050", "mobilenet", "exact (statistics: squeeze-excite)"),
    ("efficientnet_b0", "efficientnet", "exact (statistics: squeeze-excite)"),
    ("tf_efficientnet_b0", "efficientnet", "exact (statistics: squeeze-excite)"),
    ("mixnet_s", "efficientnet", "exact (statistics: squeeze-excite)"),
    ("mnasnet_100", "mnasnet", "exact"),
    ("spnasnet_100", "mnasnet", "exact"),
    ("fbnetc_100", "mnasnet", "exact"),
    ("tinynet_e", "efficientnet", "exact (statistics: squeeze-excite)"),
    ("rexnet_100", "rexnet", "exact (statistics: squeeze-excite)"),
    ("ghostnet_100", "ghostnet", "exact (statistics: squeeze-excite)"),
    ("regnetx_002", "regnet", "exact"),
    ("regnety_002", "regnet", "exact (statistics: squeeze-excite)"),
    ("repvgg_a0", "repvgg", "exact"),
    ("mobileone_s0", "mobileone", "exact"),
    ("gernet_s", "byobnet", "exact"),
    ("xception41", "xception", "exact"),
    ("inception_v3", "inception", "exact"),
    ("inception_next_atto", "inception_next", "exact"),
    ("hgnetv2_b0", "hgnet", "exact"),
    ("fastvit_t8", "fastvit", "exact"),
    ("convnext_atto", "convnext", "exact"),
    ("convnextv2_atto", "convnext", "exact (statistics: global response norm)"),
    ("nf_resnet26", "nfnet", "exact"),
    ("nf_regnet_b0", "nfnet", "exact (statistics: squeeze-excite)"),
    ("dm_nfnet_f0", "nfnet", "exact (statistics: squeeze-excite)"),
    ("tresnet_m", "tresnet", "exact (statistics: squeeze-excite)"),
    ("selecsls42b", "selecsls", "exact"),
    ("ese_vovnet19b_dw", "vovnet", "exact (statistics: squeeze-excite)"),
    ("poolformer_s12", "metaformer", "exact (statistics: group norm)"),
    ("edgenext_xx_small", "edgenext", "attention"),
    ("efficientformer_l1", "efficientformer", "exact"),
]


#: Rule Z3, read from the code: per model, the module (path in the classifier) whose refusal is a
#: genuinely non-local layer although the engine's first reason is a step of it (a reshape into
#: tokens), or whose reason string alone would not say why (run.py Rule Z5).
READ_NON_LOCAL: dict[str, tuple[str, str]] = {
    "timm.skresnet18": (
        "layer1.0.conv1.attn",
        "SelectiveKernelAttn (timm/layers/selective_kernel.py) weights the stacked kernel branches "
        "by x.sum(1).mean((2, 3)): a mean over the whole image, as in squeeze-excite; the layers "
        "refused after it use its result",
    ),
    "timm.edgenext_xx_small": (
        "stages.1.blocks.1",
        "SplitTransposeBlock (timm/models/edgenext.py) flattens space into tokens for "
        "CrossCovarianceAttn: F.normalize(q, dim=-1) normalises over every token and q @ k^T sums "
        "over every token (a C x C map from the whole image)",
    ),
    "torchvision.swin_t": (
        "features.1.0.attn",
        "shifted_window_attention (torchvision/models/swin_transformer.py) rolls the map "
        "cyclically over the whole image (torch.roll), so windows at one border hold tokens of "
        "the opposite border; the -100 mask damps their weights to e^-100 but keeps them, so "
        "each output depends on the far border; its windows are also fixed to the image grid, "
        "not sliding",
    ),
    "timm.efficientformer_l1": (
        "stages.3.blocks.3",
        "Flat (timm/models/efficientformer.py) flattens the last stage into tokens for the "
        "MetaBlock1d attention after it: q @ k^T over every position, with an attention bias "
        "sized for a fixed 7 x 7 map",
    ),
}

_CLASSIFIER_KWARGS: dict[str, dict[str, object]] = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}


def classifier(model: ZooModel) -> nn.Module:
    """The whole classifier a zoo trunk comes from (Rule Z2: random weights, seed 0), for split."""
    library, _, arch = model.name.partition(".")
    if library == "timm":
        import timm

        torch.manual_seed(0)
        return timm.create_model(arch, pretrained=False)
    return torchvision_model(arch, **_CLASSIFIER_KWARGS.get(arch, {}))


def zoo() -> list[ZooModel]:
    """Every model of the zoo, torchvision first (Rules Z1-Z3)."""
    models = [
        ZooModel(f"torchvision.{n}", "torchvision", f, e, b, 3 if n in THREE_D else 2)
        for n, f, e, b in TORCHVISION
    ]
    models += [
        ZooModel(f"timm.{n}", "timm", f, e, lambda n=n: timm_trunk(n))  # type: ignore[misc]
        for n, f, e in TIMM
    ]
    # HRNet's branches need sizes that divide by 32 and its receptive field (~550 px) is most of
    # any image Rule Z6 would derive: 640 x 608 px in 2 x 2 tiles (tests/test_multiscale.py).
    models.append(
        ZooModel(
            "timm.hrnet_w18_small",
            "timm",
            "hrnet",
            "exact",
            lambda: timm_trunk("hrnet_w18_small"),
            shape_and_tile=((1, 3, 640, 608), (620, 600)),
        )
    )
    return models
