"""The architectures of the zoo sweep: timm and torchvision classifiers with random weights.

Each is built seeded, with 10 classes, at a small input (64 px unless the model needs more),
reduced through its constructor's own arguments where that keeps the family's ops (fewer
blocks, a smaller image size); ``note`` says what was changed. Nothing is downloaded. Then
:func:`enliven` gives what initialisation left constant a random spread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer


@dataclass(frozen=True)
class ModelSpec:
    """One row of the sweep: ``build()`` gives the model (train mode, as constructed), fed
    (B, 3, ``size``, ``size``) inputs in [0, 1). ``variant``: "" (as built), "channels_last",
    "bfloat16", "frozen" (no parameter requires grad), "autocast", "user hooks",
    "grad checkpointing", "DataParallel", "torch.compile" or "Module.compile" (see
    zoo.laid_out and zoo.wrapped)."""

    name: str
    build: Callable[[], nn.Module]
    size: int = 64
    note: str = ""
    variant: str = ""


def enliven(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with its constant parameters spread out and its batch norms off the identity,
    in place; returns it.

    Initialisation hides whole paths, which would make a check against the reference void:
    zero-initialised heads (torchvision's ViT, timm's MLP-Mixers) make every input gradient
    zero, layer scales of 1e-6 and zero skip-init gains hide every residual branch, and fresh
    batch norms are the identity in eval mode. Every parameter whose entries are all one value
    c gets c + 0.1·max(1, |c|)·N(0, 1) per entry; running means get 0.1·N(0, 1), running
    variances a factor in [0.7, 1.3]. Seeded: the same model every run.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            flat = parameter.detach().flatten()
            if flat.numel() and bool((flat == flat[0]).all()):
                spread = 0.1 * max(1.0, abs(float(flat[0])))
                parameter.add_(spread * torch.randn(parameter.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) \
                    and module.running_mean is not None:
                module.running_mean.add_(0.1 * torch.randn(module.running_mean.shape,
                                                           generator=generator))
                module.running_var.mul_(0.7 + 0.6 * torch.rand(module.running_var.shape,
                                                                generator=generator))
    return model


def _timm(name: str, size: int = 64, note: str = "", **kwargs) -> ModelSpec:
    def build() -> nn.Module:
        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    given = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    return ModelSpec(f"timm/{name}", build, size, "; ".join(filter(None, (given, note))))


def _tv(name: str, build: Callable[[], nn.Module], size: int = 64, note: str = "",
        variant: str = "") -> ModelSpec:
    suffix = f" [{variant}]" if variant else ""
    return ModelSpec(f"torchvision/{name}{suffix}", build, size, note, variant)


def _small_vit() -> nn.Module:
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                             hidden_dim=64, mlp_dim=128, num_classes=10)


def _small_maxvit() -> nn.Module:
    return tvm.MaxVit(input_size=(64, 64), stem_channels=16, partition_size=4,
                      block_channels=[32, 64], block_layers=[1, 1], head_dim=16,
                      stochastic_depth_prob=0.0, num_classes=10)


TORCHVISION = (
    _tv("resnet18", lambda: tvm.resnet18(num_classes=10)),
    _tv("vgg11_bn", lambda: tvm.vgg11_bn(num_classes=10)),
    _tv("alexnet", lambda: tvm.alexnet(num_classes=10)),
    _tv("densenet121", lambda: tvm.densenet121(num_classes=10), 32,
        "final F.relu is functional"),
    _tv("squeezenet1_1", lambda: tvm.squeezenet1_1(num_classes=10), 64, "ceil-mode pools"),
    _tv("mobilenet_v2", lambda: tvm.mobilenet_v2(num_classes=10)),
    _tv("mobilenet_v3_small", lambda: tvm.mobilenet_v3_small(num_classes=10)),
    _tv("efficientnet_b0", lambda: tvm.efficientnet_b0(num_classes=10)),
    _tv("regnet_x_400mf", lambda: tvm.regnet_x_400mf(num_classes=10)),
    _tv("shufflenet_v2_x0_5", lambda: tvm.shufflenet_v2_x0_5(num_classes=10)),
    _tv("mnasnet0_5", lambda: tvm.mnasnet0_5(num_classes=10)),
    _tv("googlenet", lambda: tvm.googlenet(num_classes=10, aux_logits=False,
                                           init_weights=True), 64, "aux_logits=False"),
    _tv("inception_v3", lambda: tvm.inception_v3(num_classes=10, aux_logits=False,
                                                 init_weights=True), 75,
        "aux_logits=False; 75 px is its smallest input"),
    _tv("convnext_tiny", lambda: tvm.convnext_tiny(num_classes=10)),
    _tv("swin_t", lambda: tvm.swin_t(num_classes=10)),
    _tv("swin_v2_t", lambda: tvm.swin_v2_t(num_classes=10), 64, "cosine attention"),
    _tv("efficientnet_v2_s", lambda: tvm.efficientnet_v2_s(num_classes=10)),
    _tv("regnet_y_400mf", lambda: tvm.regnet_y_400mf(num_classes=10)),
    _tv("resnext50_32x4d", lambda: tvm.resnext50_32x4d(num_classes=10)),
    _tv("wide_resnet50_2", lambda: tvm.wide_resnet50_2(num_classes=10)),
    _tv("mobilenet_v3_large", lambda: tvm.mobilenet_v3_large(num_classes=10)),
    _tv("vit_b_16", lambda: tvm.vit_b_16(num_classes=10, image_size=32), 32, "image_size=32"),
    _tv("VisionTransformer (small)", _small_vit, 32,
        "the vit_b_16 class: 2 layers, width 64, patch 8"),
    _tv("MaxVit (small)", _small_maxvit, 64,
        "the maxvit_t class: 2 stages, partition 4, width 16-64"),
)

TIMM = (
    _timm("resnet18"),
    _timm("resnetv2_18", note="pre-activation"),
    _timm("efficientnet_b0"),
    _timm("tf_efficientnet_lite0", note="ReLU6, TF 'same' padding"),
    _timm("mobilenetv3_small_050"),
    _timm("mobilenetv4_conv_small_050"),
    _timm("ghostnet_050"),
    _timm("rexnet_100"),
    _timm("regnetx_002"),
    _timm("regnety_002"),
    _timm("convnext_atto"),
    _timm("convnextv2_atto"),
    _timm("vit_tiny_patch16_224", img_size=64, depth=4),
    _timm("deit_tiny_distilled_patch16_224", img_size=64, depth=4),
    _timm("swin_tiny_patch4_window7_224", img_size=64, window_size=4, depths=(1, 1, 2, 1)),
    _timm("beit_base_patch16_224", img_size=64, depth=2, embed_dim=96, num_heads=3),
    _timm("eva02_tiny_patch14_224", 56, img_size=56, depth=2),
    _timm("levit_128s", img_size=64),
    _timm("mixer_s16_224", img_size=64),
    _timm("resmlp_12_224", img_size=64),
    _timm("poolformer_s12"),
    _timm("coatnet_nano_rw_224", img_size=64),
    _timm("maxvit_nano_rw_256", img_size=64),
    _timm("efficientformerv2_s0", img_size=64),
    _timm("mobilevit_xxs"),
    _timm("mobilevitv2_050"),
    _timm("fastvit_t8"),
    _timm("edgenext_xx_small"),
    _timm("densenet121"),
    _timm("dla34"),
    _timm("dpn48b"),
    _timm("hrnet_w18_small"),
    _timm("cspresnet50"),
    _timm("cspdarknet53"),
    _timm("darknet17"),
    _timm("nf_resnet26"),
    _timm("nf_regnet_b0"),
    _timm("repvgg_a0"),
    _timm("sequencer2d_s"),
    _timm("pvt_v2_b0"),
    _timm("xcit_nano_12_p16_224", img_size=64, depth=2),
    _timm("convit_tiny", img_size=64, depth=3, local_up_to_layer=2),
    _timm("cait_xxs24_224", img_size=64, depth=2),
    _timm("resnest14d"),
    _timm("selecsls42b"),
    _timm("ese_vovnet19b_dw"),
    _timm("hgnetv2_b0"),
    _timm("inception_next_atto"),
    _timm("lcnet_050"),
    _timm("gernet_s"),
    _timm("botnet26t_256", img_size=64),
    _timm("lambda_resnet26t"),
    _timm("davit_tiny"),
    _timm("focalnet_tiny_srf"),
    _timm("efficientvit_b0"),
    _timm("efficientvit_m0", img_size=64),
    _timm("repvit_m0_9"),
    _timm("starnet_s050"),
    _timm("hiera_tiny_224", img_size=64),
    _timm("test_mambaout"),
    _timm("test_efficientnet_evos", note="EvoNorm"),
    _timm("test_nfnet"),
    _timm("vit_tiny_r_s16_p8_224", img_size=64, note="ResNet-ViT hybrid"),
    _timm("deit3_small_patch16_224", img_size=64, depth=3),
    _timm("vit_relpos_small_patch16_224", img_size=64, depth=2),
    _timm("vit_small_patch16_rope_224", img_size=64, depth=2),
    _timm("vit_little_patch16_reg1_gap_256", img_size=64, note="register tokens"),
    _timm("test_vit_relpos", img_size=64),
    _timm("pit_ti_224", img_size=64),
    _timm("visformer_tiny", img_size=64),
    _timm("tnt_s_patch16_224", img_size=64),
    _timm("crossvit_tiny_240", 240, note="its smallest input"),
    _timm("volo_d1_224", img_size=64, note="outlook attention"),
    _timm("coat_lite_tiny", img_size=64),
    _timm("twins_pcpvt_small"),
    _timm("nest_tiny", img_size=64),
    _timm("gcvit_xxtiny", img_size=64),
    _timm("tiny_vit_5m_224", 224, note="no img_size argument"),
    _timm("efficientformer_l1", 224, note="attention biases fixed to 224 px"),
    _timm("nextvit_small"),
    _timm("shvit_s1"),
    _timm("fastvit_mci0"),
    _timm("mobilenetv4_hybrid_medium"),
    _timm("convformer_s18"),
    _timm("caformer_s18"),
    _timm("maxxvit_rmlp_nano_rw_256", img_size=64),
    _timm("gmlp_ti16_224", img_size=64),
    _timm("convmixer_768_32"),
    _timm("convnext_zepto_rms", note="RmsNorm2d"),
    _timm("rdnet_tiny"),
    _timm("ghostnetv2_100"),
    _timm("mixnet_s"),
    _timm("efficientnet_em"),
    _timm("skresnet18", note="selective kernel softmax"),
    _timm("seresnext26d_32x4d"),
    _timm("ecaresnet26t"),
    _timm("gcresnet33ts"),
    _timm("resnet50_gn"),
    _timm("regnetz_c16_evos", note="EvoNorm"),
    _timm("hgnet_tiny"),
    _timm("cs3darknet_s"),
    _timm("tresnet_m", note="space-to-depth stem, in-place ABN"),
    _timm("xception41"),
    _timm("inception_v4", 75),
    _timm("nasnetalarge", note="separable convs, 'same' pools"),
    _timm("halonet26t", 256, note="halo attention needs 256 px"),
    _timm("resnetv2_50x1_bit", note="GroupNorm + StdConv (WS)"),
    _timm("resnetv2_50d_frn", note="FilterResponseNorm + TLU"),
    _timm("mobileone_s0"),
    _timm("dla60_res2net", note="a branch whose output is dropped"),
    _timm("efficientvit_l1", note="float32 attention inside a float64 copy"),
    _timm("vit_base_patch16_clip_quickgelu_224", img_size=64, depth=2, note="QuickGELU"),
    # Do not run at 64 px (reported as skipped).
    _timm("test_coatnet"),
    _timm("test_maxvit"),
    _timm("haloregnetz_b"),
)

def _timm_variant(name: str, variant: str, note: str = "", **kwargs) -> ModelSpec:
    spec = _timm(name, note=note, **kwargs)
    return ModelSpec(f"{spec.name} [{variant}]", spec.build, spec.size, spec.note, variant)


def _resnet18() -> nn.Module:
    return tvm.resnet18(num_classes=10)


# Variants: memory layouts, dtypes, wrappers and the user's own settings around the model.
VARIANTS = (
    _tv("resnet18", lambda: tvm.resnet18(num_classes=10), variant="channels_last"),
    ModelSpec("timm/convnext_atto [channels_last]",
              lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10),
              variant="channels_last"),
    _tv("resnet18", lambda: tvm.resnet18(num_classes=10), variant="torch.compile",
        note="torch.compile(backend='eager'): the session runs model._orig_mod"),
    _tv("mobilenet_v3_small", lambda: tvm.mobilenet_v3_small(num_classes=10),
        variant="Module.compile", note="model.compile(): refused by design"),
    _tv("resnet18", lambda: tvm.resnet18(num_classes=10), variant="bfloat16"),
    _tv("resnet18", _resnet18, variant="frozen",
        note="every parameter requires_grad=False, as when explaining a fixed model"),
    _timm_variant("vit_tiny_patch16_224", "frozen", img_size=64, depth=4),
    _tv("resnet18", _resnet18, variant="autocast",
        note="every call inside torch.autocast('cpu', bfloat16)"),
    _timm_variant("efficientnet_b0", "autocast"),
    _timm_variant("convnext_atto", "autocast"),
    _timm_variant("vit_tiny_patch16_224", "autocast", img_size=64, depth=4),
    _tv("resnet18", _resnet18, variant="DataParallel",
        note="nn.DataParallel on the CPU: no devices, runs its module in this thread"),
    _tv("resnet18", _resnet18, variant="user hooks",
        note="the user's forward hook scales layer2 by 1.5, a full backward hook on layer3"),
    _timm_variant("vit_tiny_patch16_224", "grad checkpointing", "refused by design",
                  img_size=64, depth=4),
    _timm_variant("resnet18", "grad checkpointing", "refused by design"),
    _timm_variant("resnet18", "catavgmax pool", global_pool="catavgmax"),
    # One small ResNet with each activation and norm timm offers: every gate kind and form.
    *(_timm_variant("resnet10t", f"act={act}", act_layer=act)
      for act in ("prelu", "leaky_relu", "relu6", "gelu_tanh", "hard_swish", "silu", "mish",
                  "elu", "hard_mish")),
    *(_timm_variant("resnet10t", f"norm={norm}", norm_layer=norm)
      for norm in ("layernorm2d", "groupnorm1", "rmsnorm2d")),
    # In-place activations on views (LayerNorm2d's permuted output).
    *(_timm_variant("resnet10t", f"act={act}, norm=layernorm2d", act_layer=act,
                    norm_layer="layernorm2d") for act in ("elu", "hard_sigmoid")),
    ModelSpec("timm/vit_tiny_patch16_224 [bfloat16]",
              lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                                        img_size=64, depth=4),
              note="img_size=64, depth=4", variant="bfloat16"),
)

ALL = TORCHVISION + TIMM + VARIANTS

# A few fast models that between them have every kind of gate: ReLU and pools (ceil mode),
# ReLU6 and Hardswish, LayerNorm2d and GELU, attention.
QUICK = ("torchvision/resnet18", "torchvision/squeezenet1_1", "torchvision/mobilenet_v3_small",
         "timm/convnext_atto", "timm/vit_tiny_patch16_224")


def find(names: list[str]) -> list[ModelSpec]:
    """The specs with these names (or a unique name ending), in the order given."""
    specs = []
    for name in names:
        exact = [s for s in ALL if s.name == name]
        matches = exact or [s for s in ALL if s.name.endswith("/" + name)]
        if len(matches) != 1:
            known = ", ".join(s.name for s in ALL)
            raise SystemExit(f"--models: {name!r} names {len(matches)} models; known: {known}")
        specs.append(matches[0])
    return specs


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def seeded_input(spec: ModelSpec, batch: int = 2) -> torch.Tensor:
    """(batch, 3, size, size) in [0, 1), the same for every run."""
    generator = torch.Generator().manual_seed(1)
    return torch.rand(batch, 3, spec.size, spec.size, generator=generator)
