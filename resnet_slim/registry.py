"""The closed name lists, in one place: architectures, import formats, pruning methods, INT8 variant
suffixes, deployment targets. Torch-free, so params.py builds its `Literal`s from these tuples and a
bad name is refused when params are loaded; the modules that act on a name import the same tuple.
"""

# torchvision ResNets built from params (teacher or student): each can be pruned and QAT-trained
RESNET_ARCHS = ("resnet18", "resnet34", "resnet50")
# students only: never pruned, and no QAT (torch.ao's eager fusion covers the ResNet blocks only)
STUDENT_ONLY_ARCHS = ("mobilenet_v3_small",)
STUDENT_ARCHS = RESNET_ARCHS + STUDENT_ONLY_ARCHS
# families QAT (and so the qat@student stage every run makes) can train: RESNET_ARCHS plus the
# imported He et al. CIFAR ResNets (train/model_import.py records them as "cifar_resnet")
QAT_ARCHS = RESNET_ARCHS + ("cifar_resnet",)

# what a model file given as teacher.init / distill.student.init holds
IMPORT_FORMATS = ("auto", "resnet_slim", "torchvision", "cifar_resnet")

# prune.method: channel methods remove whole channels; magnitude zeroes single weights; latency
# removes blocks and channels to a measured latency budget
CHANNEL_PRUNE_METHODS = ("bn_slimming", "l1_filter")
PRUNE_METHODS = CHANNEL_PRUNE_METHODS + ("magnitude", "latency")
# what a latency-aware plan may change (compress/latency_prune.py): remove whole residual blocks,
# narrow their insides, or both
LATENCY_STRUCTURES = ("depth", "width", "depth_width")

# the INT8 builds of a model, named `<model>_<suffix>` in benchmark.json and the report
INT8_SUFFIXES = ("qat_int8", "ptq_dynamic_int8", "ptq_int8", "torch_eager_int8")

# export.targets: the runtimes a release can be built for
EXPORT_TARGETS = ("onnx", "openvino", "tflite", "mindspore", "tensorrt")
