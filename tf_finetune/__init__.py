"""tf_finetune: fine-tune a pretrained Keras 3 / TF Hub backbone and export it for TF Serving."""

__version__ = "0.1.0"
