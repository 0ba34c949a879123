"""Residual networks: CIFAR ResNet-20/56 (He et al. 2016, v1 with projection shortcuts),
WideResNet-16-10 (Zagoruyko and Komodakis 2016, pre-activation) and ImageNet ResNet-50 (the
Keras Applications model, untrained)."""
import tf_keras as keras

_CONV = dict(padding="same", use_bias=False, kernel_initializer="he_normal")


def _cifar_resnet(input_shape, num_outputs, blocks_per_stage, normalization, name):
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Conv2D(16, 3, **_CONV)(inputs)
    x = keras.layers.ReLU()(normalization()(x))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(blocks_per_stage):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = keras.layers.Conv2D(filters, 3, strides=strides, **_CONV)(x)
            y = keras.layers.ReLU()(normalization()(y))
            y = normalization()(keras.layers.Conv2D(filters, 3, **_CONV)(y))
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = normalization()(
                    keras.layers.Conv2D(filters, 1, strides=strides, **_CONV)(shortcut))
            x = keras.layers.ReLU()(keras.layers.Add()([shortcut, y]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_outputs, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def resnet20(input_shape, num_outputs, normalization=keras.layers.BatchNormalization):
    return _cifar_resnet(input_shape, num_outputs, 3, normalization, "resnet20")


def resnet56(input_shape, num_outputs, normalization=keras.layers.BatchNormalization):
    return _cifar_resnet(input_shape, num_outputs, 9, normalization, "resnet56")


def wide_resnet16_10(input_shape, num_outputs, normalization=keras.layers.BatchNormalization):
    """WRN-16-10: 2 pre-activation blocks per stage, widths 160/320/640, no dropout."""
    depth, width = 16, 10
    blocks_per_stage = (depth - 4) // 6
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Conv2D(16, 3, **_CONV)(inputs)
    for stage, filters in enumerate((16 * width, 32 * width, 64 * width)):
        for block in range(blocks_per_stage):
            strides = 2 if stage > 0 and block == 0 else 1
            activated = keras.layers.ReLU()(normalization()(x))
            shortcut = x
            if strides != 1 or x.shape[-1] != filters:
                shortcut = keras.layers.Conv2D(filters, 1, strides=strides, **_CONV)(activated)
            y = keras.layers.Conv2D(filters, 3, strides=strides, **_CONV)(activated)
            y = keras.layers.ReLU()(normalization()(y))
            y = keras.layers.Conv2D(filters, 3, **_CONV)(y)
            x = keras.layers.Add()([shortcut, y])
    x = keras.layers.ReLU()(normalization()(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_outputs, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="wrn16_10")


def resnet50(input_shape, num_outputs, normalization=keras.layers.BatchNormalization):
    """Keras Applications' ResNet-50 with random weights (nothing is downloaded); its batch
    norm layers are replaced when another normalization is asked for."""
    model = keras.applications.ResNet50(weights=None, input_shape=input_shape,
                                        classes=num_outputs)
    if normalization is keras.layers.BatchNormalization:
        return model

    def swap_normalization(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            config = layer.get_config()
            return normalization(**{k: config[k] for k in ("axis", "momentum", "epsilon", "name")})
        return layer.__class__.from_config(layer.get_config())
    return keras.models.clone_model(model, clone_function=swap_normalization)
