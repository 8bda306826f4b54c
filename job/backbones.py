"""Registry of keras.applications backbones: constructor, preprocessing mode, minimum input size, and
whether the ONNX export converts it.

Pure data; TensorFlow is imported only when a backbone is actually built, so config validation
and `finetune-job --help` stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backbone:
    name: str
    constructor: str  # attribute of keras.applications
    # keras.applications.imagenet_utils preprocessing mode: "caffe" (BGR, mean-centred),
    # "tf" (scale to [-1, 1]), "torch" (scale to [0, 1], ImageNet mean/std), or "none" when the
    # model carries its own rescaling (EfficientNet, ConvNeXt, MobileNetV3).
    preprocess: str
    min_size: int
    # tf2onnx converts it to an ONNX model that onnxruntime runs (bench/formats.py, docs/BENCHMARKS.md
    # "Which formats convert"). It does not for EfficientNet B0-B3 and V2-B0 (their Keras Normalization
    # layer's constants become graph inputs) nor ConvNeXt (onnxruntime rejects the graph): job.config
    # refuses `onnx` in export.formats for these.
    onnx: bool = True


_ALL = [
    Backbone("vgg16", "VGG16", "caffe", 32),
    Backbone("vgg19", "VGG19", "caffe", 32),
    Backbone("resnet50", "ResNet50", "caffe", 32),
    Backbone("resnet101", "ResNet101", "caffe", 32),
    Backbone("resnet50_v2", "ResNet50V2", "tf", 32),
    Backbone("mobilenet", "MobileNet", "tf", 32),
    Backbone("mobilenet_v2", "MobileNetV2", "tf", 32),
    Backbone("mobilenet_v3_small", "MobileNetV3Small", "none", 32),
    Backbone("mobilenet_v3_large", "MobileNetV3Large", "none", 32),
    Backbone("efficientnet_b0", "EfficientNetB0", "none", 32, onnx=False),
    Backbone("efficientnet_b1", "EfficientNetB1", "none", 32, onnx=False),
    Backbone("efficientnet_b2", "EfficientNetB2", "none", 32, onnx=False),
    Backbone("efficientnet_b3", "EfficientNetB3", "none", 32, onnx=False),
    Backbone("efficientnet_v2_b0", "EfficientNetV2B0", "none", 32, onnx=False),
    Backbone("efficientnet_v2_s", "EfficientNetV2S", "none", 32),
    Backbone("xception", "Xception", "tf", 71),
    Backbone("inception_v3", "InceptionV3", "tf", 75),
    Backbone("densenet121", "DenseNet121", "torch", 32),
    Backbone("densenet169", "DenseNet169", "torch", 32),
    Backbone("densenet201", "DenseNet201", "torch", 32),
    Backbone("convnext_tiny", "ConvNeXtTiny", "none", 32, onnx=False),
]

BACKBONES: dict[str, Backbone] = {b.name: b for b in _ALL}


def _squashed(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def get(name: str) -> Backbone:
    """The registered backbone called `name`; KeyError carries a "did you mean" hint."""
    try:
        return BACKBONES[name]
    except KeyError:
        from job.errors import did_you_mean

        # Keras' class name (MobileNetV2) or another spelling (mobilenetv2, MOBILENET-V2) names one exactly.
        same = [b.name for b in _ALL if _squashed(name) in (_squashed(b.name), _squashed(b.constructor))]
        hint = (f" (did you mean '{same[0]}'?)" if same else did_you_mean(name, BACKBONES)
                or f" (one of: {', '.join(BACKBONES)})")
        raise KeyError(f"unknown backbone {name!r}{hint}") from None  # (repr: a line break in it printed two lines)
