"""Runs `tf-finetune train --flagfile=<preset> --smoke` the way a user's machine would have the
sources: tests/test_configs.py prepares KERAS_HOME and TFHUB_CACHE_DIR, and this process serves
TFDS from `tfds.testing.mock_data` (the data sets cannot be downloaded here).

Usage: python tests/smoke_driver.py <flagfile> <model_dir>
"""

import sys


def main(flagfile: str, model_dir: str) -> int:
    import tensorflow_datasets as tfds

    # keras.src: keras.applications checks a weights file against the hash of the real one
    # and would download it again; the test's random stand-ins are accepted as the real ones.
    from keras.src.utils import file_utils

    file_utils.validate_file = lambda *args, **kwargs: True

    from tf_finetune import cli

    with tfds.testing.mock_data(num_examples=24):
        return cli.main(["train", f"--flagfile={flagfile}", "--smoke", f"--model_dir={model_dir}"])


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
