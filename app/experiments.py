"""The experiment registry: each entry is a name, what it is, and its flag defaults.

The TF Model Garden order applies: these defaults, then the flagfile, then the command line.
Each experiment has a flagfile `configs/NAME.cfg` that names it and sets only what depends
on the machine (--data_dir, --model_dir): every other default lives here, once.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Experiment:
    description: str
    defaults: dict


_TFDS_NOTE = "needs --data_dir holding the TFDS data set, prepared once on a login node"

EXPERIMENTS = {
    "digits_cnn": Experiment(
        "small CNN on scikit-learn's bundled 8x8 digits (offline default)",
        dict(model="cnn", dataset="digits", batch_size=32, reference_batch_size=64,
             learning_rate=0.1, lr_scaling="linear", optimizer="momentum", momentum=0.9,
             epochs=16, warmup_epochs=2, lr_schedule="cosine", shuffle_buffer=2048,
             cache="memory")),
    "fashion_mnist_cnn": Experiment(
        "two-stage CNN on Fashion-MNIST's 60,000 images, read from Debian's "
        "dataset-fashion-mnist (the course's data, trained fast on CPUs)",
        dict(model="pooled_cnn", dataset="fashion_mnist", batch_size=64,
             reference_batch_size=64, learning_rate=0.05, lr_scaling="linear",
             optimizer="momentum", momentum=0.9, epochs=4, warmup_epochs=1,
             lr_schedule="cosine", shuffle_buffer=10_000, cache="memory")),
    "fashion_mnist_wrn": Experiment(
        "WideResNet-16-10 on Fashion-MNIST, as in the DLI multi-GPU labs (for GPUs); the "
        "data as for fashion_mnist_cnn",
        dict(model="wrn16_10", dataset="fashion_mnist", batch_size=32, reference_batch_size=32,
             learning_rate=0.01, lr_scaling="linear", optimizer="momentum", momentum=0.9,
             weight_decay=5e-6, epochs=40, warmup_epochs=5, lr_schedule="constant",
             cache="memory")),
    "cifar10_resnet20": Experiment(
        "ResNet-20 on CIFAR-10, He et al. 2016's recipe (LR 0.1 per 128 images, steps at "
        "80/120 of 160 epochs, pad-crop-flip), with Goyal et al.'s warmup above batch 128; "
        + _TFDS_NOTE,
        dict(model="resnet20", dataset="cifar10", batch_size=128, reference_batch_size=128,
             learning_rate=0.1, lr_scaling="linear", optimizer="momentum", momentum=0.9,
             weight_decay=1e-4, epochs=160, warmup_epochs=5, lr_schedule="step",
             lr_decay_epochs=["80", "120"], lr_decay_factor=0.1, cache="memory")),
    "imagenet_resnet50": Experiment(
        "ResNet-50 v1.5 on ImageNet TFRecord shards (train-*/validation-* in --data_dir), "
        "Goyal et al.'s recipe: LR 0.1 per 256 images, 5 warmup epochs, steps at 30/60/80 "
        "of 90, random-resized crops for training, the 0.875 center crop for evaluation",
        dict(model="resnet50", dataset="imagenet", batch_size=64, reference_batch_size=256,
             learning_rate=0.1, lr_scaling="linear", optimizer="momentum", momentum=0.9,
             weight_decay=1e-4, epochs=90, warmup_epochs=5, lr_schedule="step",
             lr_decay_epochs=["30", "60", "80"], lr_decay_factor=0.1, image_size=224)),
    "synthetic_resnet50": Experiment(
        "ResNet-50 on generated 224x224 images, for throughput benchmarks",
        dict(model="resnet50", dataset="synthetic", batch_size=32, reference_batch_size=256,
             learning_rate=0.1, lr_scaling="linear", optimizer="momentum", momentum=0.9,
             epochs=1, steps_per_epoch=20, validation_steps=1, image_size=224)),
    "faultseg3d": Experiment(
        "FaultSeg3D (Wu et al. 2019): its 3D U-Net on 200 synthetic 128^3 surveys (20 for "
        "validation) made by its recipe, Adam 1e-4, class-balanced cross-entropy, one volume "
        "per GPU; for GPUs",
        dict(model="unet3d", dataset="seismic_faults", volume_size=128, num_volumes=200,
             batch_size=1, reference_batch_size=1, learning_rate=1e-4, lr_scaling="sqrt",
             optimizer="adam", epochs=100, warmup_epochs=2, lr_schedule="constant",
             segmentation_loss="balanced_crossentropy", cache="memory", shuffle_buffer=200)),
    "seismic_faults_cpu": Experiment(
        "fault segmentation that trains on the CPUs here: an 8-16-32 3D U-Net on 32^3 "
        "patches of 64 synthetic 40^3 surveys",
        dict(model="unet3d_small", dataset="seismic_faults", volume_size=40, patch_size=32,
             num_volumes=64, batch_size=2, reference_batch_size=4, learning_rate=2e-3,
             lr_scaling="sqrt", optimizer="adam", epochs=36, warmup_epochs=2,
             lr_schedule="cosine", segmentation_loss="balanced_crossentropy", cache="memory",
             shuffle_buffer=64)),
    "seismic_facies_sections": Experiment(
        "facies on inline sections (Alaudah et al.'s section-based setting): a 2D U-Net, "
        "8 facies of 64 synthetic 64^3 surveys",
        dict(model="unet2d_small", dataset="seismic_facies_sections", volume_size=64,
             num_volumes=64, num_facies=8, batch_size=4, reference_batch_size=8,
             learning_rate=2e-3, lr_scaling="sqrt", optimizer="adam", epochs=12,
             warmup_epochs=1, lr_schedule="cosine", segmentation_loss="crossentropy",
             cache="memory", shuffle_buffer=64)),
    "topology_cpu": Experiment(
        "3D topology optimization as voxel segmentation on the CPUs here: an 8-16-32 3D "
        "U-Net learns SIMP's designs of 128 random load cases on 16^3 cubes",
        dict(model="unet3d_small", dataset="topology", volume_size=16, num_volumes=128,
             batch_size=4, reference_batch_size=8, learning_rate=2e-3, lr_scaling="sqrt",
             optimizer="adam", epochs=30, warmup_epochs=2, lr_schedule="cosine",
             # a small buffer: the first epoch makes the designs, and a step must not wait
             # for a rank's whole shard (--stall_timeout)
             segmentation_loss="balanced_crossentropy", cache="memory", shuffle_buffer=16)),
    "topology_gpu64": Experiment(
        "topology optimization at 64^3 for GPUs: FaultSeg3D's 3D U-Net on SIMP's designs of "
        "1024 random load cases (made once by the ranks' CPU cores; minutes per design: "
        "docs/topology.md)",
        dict(model="unet3d", dataset="topology", volume_size=64, num_volumes=1024,
             batch_size=2, reference_batch_size=8, learning_rate=1e-3, lr_scaling="sqrt",
             optimizer="adam", epochs=60, warmup_epochs=3, lr_schedule="cosine",
             segmentation_loss="balanced_crossentropy", cache="memory", shuffle_buffer=16)),
    "topology_gpu128": Experiment(
        "topology optimization at 128^3 for GPUs: the 3D residual U-Net, one design per GPU "
        "with batch norm synchronized over all of them; add --spatial_parts=2 where a GPU "
        "cannot hold a design's activations",
        dict(model="resunet3d", dataset="topology", volume_size=128, num_volumes=256,
             batch_size=1, reference_batch_size=8, learning_rate=1e-3, lr_scaling="sqrt",
             optimizer="adam", epochs=80, warmup_epochs=5, lr_schedule="cosine",
             sync_batch_norm=True, segmentation_loss="balanced_crossentropy",
             cache="memory", shuffle_buffer=8)),
    "linear_regression": Experiment(
        "the neuron y = w*x + b of Lab 1, fitted with minibatch SGD and MSE",
        dict(model="linear", dataset="linear", batch_size=32, reference_batch_size=32,
             learning_rate=0.1, lr_scaling="none", optimizer="sgd", epochs=10)),
}
