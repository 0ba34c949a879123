"""Which type a run computes in. `--mixed_precision=auto` (the default) takes bfloat16 where
the processor computes it natively: CPUs with AMX or AVX512_BF16, GPUs of compute capability
8.0 and above (bfloat16 tensor cores); float32 elsewhere, where bfloat16 is converted to
float32 to compute and runs 5-10x slower (BENCHMARKS.md, "Precision chosen by the hardware").
float16 is taken only when asked: it needs loss scaling, and CPUs compute it in software."""
import collections

import keras

# The CPU flags (/proc/cpuinfo) of bfloat16 arithmetic, the first a CPU has named.
BFLOAT16_CPU_FLAGS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512_BF16"))
BFLOAT16_GPU_CAPABILITY = (8, 0)  # Ampere (A100) and newer
# What one process computes on: its CPU's flags, and its GPU's compute capability (None
# without a GPU).
Hardware = collections.namedtuple("Hardware", "cpu_flags gpu_capability")
# The Keras policy a run computes in, and why it was chosen.
Choice = collections.namedtuple("Choice", "policy reason")


def first_processor(cpuinfo):
    """{field: value} of the first processor in the text of /proc/cpuinfo."""
    fields = {}
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    return fields


def cpu_flags(cpuinfo):
    """The flags of the first processor in the text of /proc/cpuinfo."""
    return frozenset(first_processor(cpuinfo).get("flags", "").split())


def this_process():
    """The Hardware this process computes on (its GPU: the first TensorFlow sees, once the
    local rank's is pinned)."""
    import tensorflow as tf
    with open("/proc/cpuinfo") as cpuinfo:
        flags = cpu_flags(cpuinfo.read())
    gpus = tf.config.get_visible_devices("GPU")
    capability = (tuple(tf.config.experimental.get_device_details(gpus[0])
                        .get("compute_capability", (0, 0))) if gpus else None)
    return Hardware(flags, capability)


def computes_bfloat16(hardware):
    """(whether `hardware` computes bfloat16 natively, the reason: the CPU flag, or the
    GPU's compute capability)."""
    if hardware.gpu_capability is not None:
        major, minor = hardware.gpu_capability
        if tuple(hardware.gpu_capability) >= BFLOAT16_GPU_CAPABILITY:
            return True, f"the GPU's compute capability {major}.{minor} has bfloat16 tensor cores"
        return False, (f"the GPU's compute capability {major}.{minor} has no bfloat16 tensor "
                       f"cores (8.0 and above have)")
    for flag, unit in BFLOAT16_CPU_FLAGS:
        if flag in hardware.cpu_flags:
            return True, f"the CPU computes bfloat16 with {unit} (flag {flag})"
    return False, ("the CPU has neither AMX (amx_bf16) nor AVX512_BF16 (avx512_bf16): it "
                   "would convert bfloat16 to float32 to compute")


def choose(requested, float64, hardware_of_ranks, saved_model=False):
    """The Choice for --mixed_precision=`requested` (auto, float32, bfloat16, float16) and
    --float64, on the Hardware of every rank: auto takes bfloat16 only where every rank
    computes it, so that all ranks compute alike. A saved model's layers keep the types
    they were saved with (policy None)."""
    if saved_model:
        return Choice(None, "a saved model's layers keep the types they were saved with")
    if float64:
        return Choice("float64", "--float64")
    if requested != "auto":
        policy = "float32" if requested == "float32" else f"mixed_{requested}"
        return Choice(policy, f"--mixed_precision={requested}")
    answers = [computes_bfloat16(hardware) for hardware in hardware_of_ranks]
    lacking = [rank for rank, (native, _) in enumerate(answers) if not native]
    if not lacking:
        return Choice("mixed_bfloat16", f"auto: {answers[0][1]}")
    rank = lacking[0]
    where = f"rank {rank}: " if len(lacking) < len(answers) else ""  # named where ranks differ
    return Choice("float32", f"auto: {where}{answers[rank][1]}")


def apply(choice):
    """Makes `choice` Keras' global policy, for the layers built after; float64 also as
    Keras' float type (models.use_float64). Whatever the choice (a saved model keeps its
    layers' types), Keras' Conv3D computes the few bfloat16 convolutions oneDNN gets wrong
    in float32 (convolve_shallow_inputs_in_float32)."""
    convolve_shallow_inputs_in_float32()
    if choice.policy is None:
        return
    if choice.policy == "float64":
        import models
        models.use_float64()
    else:
        keras.mixed_precision.set_global_policy(choice.policy)


def shallow_for_onednn(depth, kernel_depth, padding):
    """Whether oneDNN's bfloat16 filter gradient (Conv3DBackpropFilterV2, TensorFlow 2.21)
    may come out wrong for a `same` convolution of a `depth`-deep input under a kernel
    spanning `kernel_depth` planes: measured wrong (values to 1e37, inf, NaN) at a depth of
    2 under a 3-deep kernel and of 2-4 under a 5-deep one, right at 3 and at 6
    (BENCHMARKS.md); below twice the kernel's depth is taken as shallow, with a margin."""
    return padding == "same" and depth is not None and depth < 2 * kernel_depth


def convolve_shallow_inputs_in_float32():
    """Patches Keras' Conv3D, in this process, to convolve an input shallow for oneDNN
    (shallow_for_onednn) in float32, so that every model, the users' too, trains on right
    gradients; such inputs are the deepest levels of small volumes, a sliver of a step."""
    convolution_op = keras.layers.Conv3D.convolution_op
    if getattr(convolution_op, "shallow_in_float32", False):
        return

    def convolution(layer, inputs, kernel):
        depth = inputs.shape[1 if layer.data_format == "channels_last" else 2]
        spanned = (layer.kernel_size[0] - 1) * layer.dilation_rate[0] + 1
        if inputs.dtype == "bfloat16" and shallow_for_onednn(depth, spanned, layer.padding):
            outputs = convolution_op(layer, keras.ops.cast(inputs, "float32"),
                                     keras.ops.cast(kernel, "float32"))
            return keras.ops.cast(outputs, "bfloat16")
        return convolution_op(layer, inputs, kernel)
    convolution.shallow_in_float32 = True
    keras.layers.Conv3D.convolution_op = convolution
