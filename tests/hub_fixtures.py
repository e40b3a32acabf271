"""Build tiny TF Hub style (Reusable SavedModel API) modules for offline tests.

Each ``save_*`` function writes a SavedModel to ``path`` and returns ``path``. The
modules follow https://www.tensorflow.org/hub/reusable_saved_models: a
``@tf.function __call__`` plus ``variables``, ``trainable_variables`` and
``regularization_losses`` attributes. They are tiny on purpose (16 px images,
a handful of channels) so the tests stay fast on 2 CPU cores.

This file may be run as a script to write all fixtures into a directory, which is
handy when poking at HubLayer by hand::

    python tests/hub_fixtures.py /tmp/hub_modules
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import tensorflow as tf

IMAGE_SIZE = 16
FEATURE_DIM = 8
VOCAB = ["the", "cat", "sat", "on", "mat", "dog", "ran", "fast"]
TEXT_DIM = 6


# tf.Module defines read-only `variables`/`trainable_variables` properties, but the
# Reusable SavedModel API wants them as plain saved attributes, so the modules
# derive from the AutoTrackable base that tf.Module itself builds on.
_Trackable = tf.__internal__.tracking.AutoTrackable


def _init(shape, seed, scale=0.5):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.normal(0.0, scale, size=shape).astype("float32"))


class _FeatureVector(_Trackable):
    """conv3x3 -> relu -> global mean pool -> [batch, dim]; optional dict output.

    No ``training`` argument (exercises the ``obj(inputs)`` branch).
    """

    def __init__(self, image_size, dim, seed, output, l2):
        super().__init__()
        self.kernel = tf.Variable(_init([3, 3, 3, dim], seed), name="conv/kernel")
        self.bias = tf.Variable(tf.zeros([dim]), name="conv/bias")
        self._output = output
        self._l2 = l2
        self.variables_list = [self.kernel, self.bias]
        if output == "logits":
            self.head = tf.Variable(_init([dim, 5], seed + 1), name="logits/kernel")
            self.variables_list.append(self.head)
        size = image_size if image_size else None
        spec = tf.TensorSpec([None, size, size, 3], tf.float32)
        self.__call__ = tf.function(self._call, input_signature=[spec])
        self.regularization_losses = [
            tf.function(self._reg_loss, input_signature=[]),
        ]

    def _reg_loss(self):
        return self._l2 * tf.reduce_sum(tf.square(self.kernel))

    def _call(self, images):
        x = tf.nn.conv2d(images, self.kernel, strides=1, padding="SAME") + self.bias
        pooled = tf.reduce_mean(tf.nn.relu(x), axis=[1, 2])
        if self._output == "logits":
            return tf.matmul(pooled, self.head)
        if self._output == "dict":
            return {"default": pooled * 2.0, "pooled_output": pooled, "sequence_output": x}
        return pooled


def save_feature_vector_module(
    path,
    *,
    image_size: int | None = IMAGE_SIZE,
    dim: int = FEATURE_DIM,
    seed: int = 0,
    output: str = "vector",
    l2: float = 0.01,
):
    """Image feature-vector module: float32 [b, h, w, 3] in [0, 1] -> [b, dim].

    output: "vector" (rank-2 features), "logits" (a 5-class classifier on top) or
    "dict" ({"default", "pooled_output", "sequence_output"}).
    image_size: fixed spatial size in the signature, or None for dynamic.
    """
    module = _FeatureVector(image_size, dim, seed, output, l2)
    module.variables = list(module.variables_list)
    module.trainable_variables = list(module.variables_list)
    tf.saved_model.save(module, str(path))
    return str(path)


class _BatchNormNet(_Trackable):
    """conv -> batch norm (moving stats) -> relu -> mean pool; ``__call__(x, training)``.

    Moving mean/variance are non-trainable ON_READ/MEAN variables like the ones
    Keras BatchNormalization layers put in real hub modules; they are updated
    only when ``training=True``.
    """

    def __init__(self, image_size, dim, seed, momentum):
        super().__init__()
        self.kernel = tf.Variable(_init([3, 3, 3, dim], seed), name="conv/kernel")
        self.gamma = tf.Variable(tf.ones([dim]), name="bn/gamma")
        self.beta = tf.Variable(tf.zeros([dim]), name="bn/beta")
        stat = {
            "trainable": False,
            "synchronization": tf.VariableSynchronization.ON_READ,
            "aggregation": tf.VariableAggregation.MEAN,
        }
        self.moving_mean = tf.Variable(tf.zeros([dim]), name="bn/moving_mean", **stat)
        self.moving_variance = tf.Variable(tf.ones([dim]), name="bn/moving_variance", **stat)
        self.momentum = momentum
        self.image_size = image_size

    @tf.function
    def __call__(self, images, training=False):
        x = tf.nn.conv2d(images, self.kernel, strides=1, padding="SAME")
        if training:
            mean, variance = tf.nn.moments(x, axes=[0, 1, 2])
            m = self.momentum
            self.moving_mean.assign(m * self.moving_mean + (1.0 - m) * mean)
            self.moving_variance.assign(m * self.moving_variance + (1.0 - m) * variance)
        else:
            mean, variance = self.moving_mean, self.moving_variance
        x = tf.nn.batch_normalization(x, mean, variance, self.beta, self.gamma, 1e-3)
        return tf.reduce_mean(tf.nn.relu(x), axis=[1, 2])


def save_batchnorm_module(
    path, *, image_size: int = IMAGE_SIZE, dim: int = FEATURE_DIM, seed: int = 0, momentum=0.5
):
    """Image module whose ``__call__(images, training)`` updates moving stats in training."""
    module = _BatchNormNet(image_size, dim, seed, momentum)
    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32)
    module.__call__.get_concrete_function(spec, training=False)
    module.__call__.get_concrete_function(spec, training=True)
    module.variables = [
        module.kernel,
        module.gamma,
        module.beta,
        module.moving_mean,
        module.moving_variance,
    ]
    module.trainable_variables = [module.kernel, module.gamma, module.beta]
    module.regularization_losses = []
    tf.saved_model.save(module, str(path))
    return str(path)


def _vocabulary(vocab_file):
    """One token per line -> its line number (the file becomes a SavedModel asset)."""
    return tf.lookup.TextFileInitializer(
        vocab_file,
        key_dtype=tf.string,
        key_index=tf.lookup.TextFileIndex.WHOLE_LINE,
        value_dtype=tf.int64,
        value_index=tf.lookup.TextFileIndex.LINE_NUMBER,
    )


class _TextEmbedding(_Trackable):
    """Whitespace tokens -> vocabulary lookup (asset file) -> embedding -> mean."""

    def __init__(self, vocab_file, dim, seed):
        super().__init__()
        self.table = tf.lookup.StaticVocabularyTable(_vocabulary(vocab_file), num_oov_buckets=1)
        self.embeddings = tf.Variable(_init([len(VOCAB) + 1, dim], seed), name="embeddings")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, sentences):
        tokens = tf.strings.split(tf.strings.lower(sentences))
        ids = tf.ragged.map_flat_values(self.table.lookup, tokens)
        vectors = tf.ragged.map_flat_values(tf.gather, self.embeddings, ids)
        total = tf.reduce_sum(vectors, axis=1)
        count = tf.cast(tf.maximum(tokens.row_lengths(), 1), tf.float32)
        return total / count[:, None]


def save_text_module(path, *, dim: int = TEXT_DIM, seed: int = 0):
    """Text module: tf.string [batch] -> [batch, dim]; the vocabulary is a SavedModel asset."""
    path = str(path)
    # The vocabulary is written to a scratch dir; saving copies it into
    # <path>/assets, so the module does not depend on the scratch file.
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = os.path.join(scratch, "vocab.txt")
        with open(vocab_file, "w") as f:
            f.write("\n".join(VOCAB) + "\n")
        module = _TextEmbedding(vocab_file, dim, seed)
        module.variables = [module.embeddings]
        module.trainable_variables = [module.embeddings]
        module.regularization_losses = []
        tf.saved_model.save(module, path)
    return path


class _SignatureOnly(_Trackable):
    def __init__(self, seed):
        super().__init__()
        self.w = tf.Variable(_init([3, 4], seed), name="w")

    @tf.function(input_signature=[tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32)])
    def serve(self, images):
        pooled = tf.reduce_mean(images, axis=[1, 2])
        return {"features": tf.matmul(pooled, self.w), "mean": pooled}


def save_signature_only_module(path, *, seed: int = 0):
    """A plain TF2 SavedModel: no ``__call__``, only a ``serving_default`` signature."""
    module = _SignatureOnly(seed)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return str(path)


# BERT-style pair: a preprocessor (strings -> token ids, no trainable variables) and an
# encoder taking its dict, with a `training` argument (dropout) like real TF Hub encoders.
BERT_SPECIAL = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
SEQ_LENGTH = 8


class _BertPreprocessor(_Trackable):
    def __init__(self, vocab_file, seq_length):
        super().__init__()
        self.table = tf.lookup.StaticHashTable(_vocabulary(vocab_file), default_value=3)  # [UNK]
        self.seq_length = seq_length

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, sentences):
        tokens = tf.strings.split(tf.strings.lower(sentences))
        ids = tf.ragged.map_flat_values(self.table.lookup, tokens)
        cls = tf.ones_like(ids[:, :1])
        ids = tf.concat([cls, ids], axis=1)[:, : self.seq_length]
        word_ids = tf.cast(ids.to_tensor(0, shape=[None, self.seq_length]), tf.int32)
        return {
            "input_word_ids": word_ids,
            "input_mask": tf.cast(word_ids > 0, tf.int32),
            "input_type_ids": tf.zeros_like(word_ids),
        }


def save_bert_preprocessor(path, *, seq_length: int = SEQ_LENGTH):
    """BERT-style preprocessor: tf.string [batch] -> {input_word_ids, input_mask, input_type_ids}."""
    path = str(path)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = os.path.join(scratch, "vocab.txt")
        with open(vocab_file, "w") as f:
            f.write("\n".join(BERT_SPECIAL + VOCAB) + "\n")
        module = _BertPreprocessor(vocab_file, seq_length)
        module.variables = []
        module.trainable_variables = []
        module.regularization_losses = []
        tf.saved_model.save(module, path)
    return path


class _TFTextBertPreprocessor(_Trackable):
    """Like TF Hub's bert_en_uncased_preprocess, made of the same TF Text ops.

    ``tensorflow_text.BertTokenizer(lower_case=True)`` runs CaseFoldUTF8, NormalizeUTF8,
    RegexSplitWithOffsets and WordpieceTokenizeWithOffsets; ``combine_segments`` adds
    [CLS]/[SEP] and ``pad_model_inputs`` truncates/pads to ``seq_length``.
    """

    def __init__(self, vocab_file, seq_length):
        super().__init__()
        import tensorflow_text as text

        self.tokenizer = text.BertTokenizer(vocab_file, lower_case=True, token_out_type=tf.int64)
        self.seq_length = seq_length

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, sentences):
        import tensorflow_text as text

        tokens = self.tokenizer.tokenize(sentences).merge_dims(-2, -1)
        cls_id, sep_id = BERT_SPECIAL.index("[CLS]"), BERT_SPECIAL.index("[SEP]")
        ids, type_ids = text.combine_segments(
            [tokens], start_of_sequence_id=cls_id, end_of_segment_id=sep_id
        )
        word_ids, mask = text.pad_model_inputs(ids, max_seq_length=self.seq_length)
        type_ids, _ = text.pad_model_inputs(type_ids, max_seq_length=self.seq_length)
        return {
            "input_word_ids": tf.cast(word_ids, tf.int32),
            "input_mask": tf.cast(mask, tf.int32),
            "input_type_ids": tf.cast(type_ids, tf.int32),
        }


def save_tftext_bert_preprocessor(path, *, seq_length: int = SEQ_LENGTH):
    """:func:`save_bert_preprocessor`'s interface, made of TF Text ops (needs tensorflow_text).

    Loading it in a process that has not imported tensorflow_text fails with
    "Op type not registered 'CaseFoldUTF8'", exactly like the real bert_en_uncased_preprocess.
    Its ids match :func:`save_bert_encoder`'s vocabulary.
    """
    path = str(path)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = os.path.join(scratch, "vocab.txt")
        with open(vocab_file, "w") as f:
            f.write("\n".join(BERT_SPECIAL + VOCAB) + "\n")
        module = _TFTextBertPreprocessor(vocab_file, seq_length)
        module.variables = []
        module.trainable_variables = []
        module.regularization_losses = []
        tf.saved_model.save(module, path)
    return path


def rename_op(path, old: str, new: str) -> str:
    """Rewrites saved_model.pb so every ``old`` op node becomes ``new`` (e.g. a made-up op).

    For "an op no installed library registers": the graph stays well-formed, only the op name
    changes. Returns ``path``; raises if ``old`` does not occur.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    pb = os.path.join(str(path), "saved_model.pb")
    saved = saved_model_pb2.SavedModel()
    with open(pb, "rb") as f:
        saved.ParseFromString(f.read())
    count = 0
    for graph in saved.meta_graphs:
        nodes = list(graph.graph_def.node)
        for function in graph.graph_def.library.function:
            nodes += list(function.node_def)
        for node in nodes:
            if node.op == old:
                node.op = new
                count += 1
    if not count:
        raise ValueError(f"no {old} op in {pb}")
    with open(pb, "wb") as f:
        f.write(saved.SerializeToString())
    return str(path)


class _BertEncoder(_Trackable):
    def __init__(self, vocab_size, hidden, seed):
        super().__init__()
        self.embeddings = tf.Variable(_init([vocab_size, hidden], seed), name="embeddings")
        self.pooler = tf.Variable(_init([hidden, hidden], seed + 1), name="pooler/kernel")

    @tf.function
    def __call__(self, inputs, training=False):
        x = tf.gather(self.embeddings, inputs["input_word_ids"])
        if training:
            # Dropout with an explicitly unseeded op (seed=seed2=0), as in modules exported
            # without a global seed, whatever seed the process that saves this has set.
            keep = tf.raw_ops.RandomUniform(shape=tf.shape(x), dtype=tf.float32, seed=0, seed2=0)
            x = tf.where(keep >= 0.1, x / 0.9, tf.zeros_like(x))
        mask = tf.cast(inputs["input_mask"], tf.float32)[:, :, None]
        mean = tf.reduce_sum(x * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
        pooled = tf.tanh(tf.matmul(mean, self.pooler))
        return {"pooled_output": pooled, "sequence_output": x, "default": pooled}


def save_bert_encoder(path, *, seq_length: int = SEQ_LENGTH, hidden: int = TEXT_DIM, seed: int = 0):
    """BERT-style encoder: the preprocessor's dict -> {pooled_output, sequence_output, default}."""
    module = _BertEncoder(len(BERT_SPECIAL) + len(VOCAB), hidden, seed)
    spec = {
        name: tf.TensorSpec([None, seq_length], tf.int32, name=name)
        for name in ("input_word_ids", "input_mask", "input_type_ids")
    }
    module.__call__.get_concrete_function(spec, training=False)
    module.__call__.get_concrete_function(spec, training=True)
    module.variables = [module.embeddings, module.pooler]
    module.trainable_variables = [module.embeddings, module.pooler]
    module.regularization_losses = []
    tf.saved_model.save(module, str(path))
    return str(path)


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/hub_modules"
    save_feature_vector_module(os.path.join(out, "feature_vector"))
    save_feature_vector_module(os.path.join(out, "classifier"), output="logits")
    save_feature_vector_module(os.path.join(out, "dict_output"), output="dict")
    save_feature_vector_module(os.path.join(out, "dynamic"), image_size=None)
    save_batchnorm_module(os.path.join(out, "batchnorm"))
    save_text_module(os.path.join(out, "text"))
    save_signature_only_module(os.path.join(out, "signature_only"))
    save_bert_preprocessor(os.path.join(out, "bert_preprocess"))
    save_bert_encoder(os.path.join(out, "bert_encoder"))
    save_tftext_bert_preprocessor(os.path.join(out, "bert_preprocess_tftext"))
    print(out)
