"""The tiny conv net that tests/mw_worker.py and tests/mw_mirrored.py train (subprocesses)."""


def compiled_model(strategy, num_classes: int):
    """A 16x16x1 -> `num_classes` logits conv net, seeded, compiled under `strategy`."""
    import keras  # after the caller has set up its strategy and devices

    keras.utils.set_random_seed(1)
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((16, 16, 1)),
                keras.layers.Conv2D(4, 3, activation="relu"),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(num_classes),
            ]
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    return model
