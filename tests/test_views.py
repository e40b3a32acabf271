"""Augmented views for --cache_views (issue 14 item 5): seeded per image and view."""

import numpy as np
import tensorflow as tf

from tf_finetune import data


def test_views_are_seeded_per_image_and_view_and_keep_the_size():
    ramp = tf.tile(tf.linspace(0.0, 255.0, 40)[None, :, None], [40, 1, 3])  # dark left
    views = {
        (i, v): data.augmented_view(ramp, 7, tf.constant(i), v) for i in (0, 1) for v in (1, 2)
    }
    for (i, v), x in views.items():
        assert x.shape == (40, 40, 3)
        np.testing.assert_array_equal(x, data.augmented_view(ramp, 7, tf.constant(i), v))
    assert not np.array_equal(views[0, 1], views[0, 2])  # another view of the same image
    assert not np.array_equal(views[0, 1], views[1, 1])  # the same view of another image
    assert not np.array_equal(views[0, 1], data.augmented_view(ramp, 8, tf.constant(0), 1))
    # Mirrored about half the time: the ramp then runs from bright to dark.
    mirrored = [
        float(tf.reduce_mean(x[:, 0] - x[:, -1])) > 0
        for x in (data.augmented_view(ramp, 7, tf.constant(i), 1) for i in range(24))
    ]
    assert 4 <= sum(mirrored) <= 20


def test_a_view_is_never_the_clean_image():
    # At 16 px some crops keep the whole image; those views are mirrored.
    noise = tf.random.stateless_uniform([16, 16, 3], seed=[0, 1], maxval=255.0)
    for i in range(200):
        assert not np.array_equal(data.augmented_view(noise, 42, tf.constant(i), 1), noise), i
