"""TF Hub backbones: what a module takes (read before anything heavy runs) and the classifier.

`--backbone` is a TF Hub handle when it is a URL, a `gs://` path or a filesystem path (Keras
Applications names never contain a `/`). The module's call signature decides the model:

* images (float32 [batch, h, w, 3]): raw 0-255 pixels -> `Rescaling(1/255)` (TF Hub modules
  take [0, 1] and normalise inside) -> the module -> head. The input size is `--image_size`,
  else the size the module's signature fixes, else 224; a mismatch is a UserError.
* text (tf.string [batch], e.g. nnlm, universal-sentence-encoder): strings -> module -> head.
* a dict of token ids (a BERT-style encoder): needs `--preprocessor=<handle>`, the module that
  turns strings into that dict; the encoder's `pooled_output` feeds the head.

The head is the same as for Keras Applications backbones (`output_dropout` -> `predictions`),
added on top of whatever the module returns: for a classification module that is on top of
its logits (nothing inside the module is replaced). `--unfreeze` is 0 (the module frozen, run
in inference mode) or all (its trainable variables fine-tuned, run with training=True so its
batch norm and dropout behave as in training); a hub module is one opaque layer, so a number
of top layers means nothing and is refused.
"""

import dataclasses

import keras
import tensorflow as tf
from absl import logging

from tf_finetune import head, hub
from tf_finetune.backbone_table import is_hub_backbone  # noqa: F401 - this module's API
from tf_finetune.errors import UserError

DEFAULT_IMAGE_SIZE = 224


# ----------------------------------------------------------------------------- signatures
@dataclasses.dataclass(frozen=True)
class ModuleSignature:
    """The input and output of a module's `__call__`, read from its saved_model.pb."""

    path: str
    input: tf.TensorSpec | dict
    output: tf.TensorSpec | dict

    @property
    def takes_text(self) -> bool:
        return isinstance(self.input, tf.TensorSpec) and self.input.dtype == tf.string

    @property
    def takes_images(self) -> bool:
        return isinstance(self.input, tf.TensorSpec) and self.input.shape.rank == 4

    @property
    def takes_dict(self) -> bool:
        return isinstance(self.input, dict)

    @property
    def image_size(self) -> int | None:
        """The square size the signature fixes, or None when it takes any size."""
        if not self.takes_images:
            return None
        height, width = self.input.shape[1], self.input.shape[2]
        return int(height) if height is not None and height == width else None


def read_signature(path: str, endpoint: str = "__call__") -> ModuleSignature:
    """Reads the `__call__` (or `endpoint`'s) signature of the SavedModel in `path` without
    loading it.

    Parsing saved_model.pb leaves TensorFlow's devices uninitialised, so `--cpu_replicas` can
    still split the CPU afterwards (loading the module would fix the device list for good).
    """
    # tensorflow.python: decoding a saved signature without loading the module has no public
    # API (tf.saved_model.load would initialise the devices, see above).
    from tensorflow.python.saved_model import nested_structure_coder

    saved = hub.read_saved_model(path)
    graph = saved.meta_graphs[0].object_graph_def
    children = {c.local_name: c.node_id for c in graph.nodes[0].children}
    node = graph.nodes[children[endpoint]] if endpoint in children else None
    if (
        node is None
        or node.WhichOneof("kind") != "function"
        or not node.function.concrete_functions
    ):
        raise UserError(
            f"the SavedModel in {path} has no {endpoint} (a TF1 Hub format module or a plain "
            "serving export); use a TF2 module of the Reusable SavedModel API, or a Keras 3 "
            "model.export() folder."
        )
    function = graph.concrete_functions[node.function.concrete_functions[0]]
    args, kwargs = nested_structure_coder.decode_proto(function.canonicalized_input_signature)
    inputs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, tf.TensorSpec | dict)]
    if len(inputs) != 1:
        raise UserError(f"the hub module in {path} takes {len(inputs)} tensor inputs; need one.")
    output = nested_structure_coder.decode_proto(function.output_signature)
    return ModuleSignature(path, inputs[0], output)


def read_checked_signature(handle: str, flag: str) -> ModuleSignature:
    """Resolves a hub handle (downloading it if needed), checks its ops, reads its signature.

    The op check registers TF Text's ops (``import tensorflow_text``) and turns an op that no
    installed library registers into one line naming it and its likely package, before
    anything heavy runs. Nothing is loaded, so TensorFlow's devices stay uninitialised.
    """
    path = hub.resolve_handle(handle)
    signature = read_signature(path)
    hub.check_ops(path, f"{flag}={handle}")
    return signature


_RANDOM_OPS = frozenset(
    {
        "RandomUniform",
        "RandomUniformInt",
        "RandomStandardNormal",
        "TruncatedNormal",
        "RandomShuffle",
        "Multinomial",
        "RandomGamma",
        "RandomPoisson",
        "RandomPoissonV2",
    }
)


def unseeded_random_ops(path: str) -> list[str]:
    """Names of the random ops without a seed in the SavedModel's functions (e.g. dropout).

    TensorFlow refuses to run them under op determinism ("random ops must have a seed").
    """
    saved = hub.read_saved_model(path)
    found = []
    for graph in saved.meta_graphs:
        for function in graph.graph_def.library.function:
            for node in function.node_def:
                if node.op in _RANDOM_OPS and not (node.attr["seed"].i or node.attr["seed2"].i):
                    found.append(f"{function.signature.name}/{node.name}")
    return found


def can_be_deterministic(config) -> bool:
    """False for a fine-tuned hub module holding unseeded random ops (its dropout).

    Fine-tuning runs the module with training=True, where those ops run; frozen modules run
    in inference mode and never do.
    """
    if not is_hub_backbone(config.backbone, config.model_dir) or config.unfreeze != "all":
        return True
    found = unseeded_random_ops(hub.resolve_handle(config.backbone))
    if found:
        logging.warning(
            "%s has %d unseeded random op(s) (dropout?), e.g. %s: fine-tuning it is not "
            "bit-reproducible, so op determinism is off for this run.",
            config.backbone,
            len(found),
            found[0],
        )
    return not found


# ----------------------------------------------------------------------------- config
def resolve(config):
    """Reads the module's signature, checks the flags against it and fills the image size;
    returns the resolved config (the flag-only hub rules are validation.hub_backbone_options).

    Downloads the module (and preprocessor) into the hub cache if needed, so an unreachable
    handle fails here with one line naming TFHUB_CACHE_DIR.
    """
    signature = read_checked_signature(config.backbone, "--backbone")
    if config.preprocessor:
        pre = read_checked_signature(config.preprocessor, "--preprocessor")
        if not pre.takes_text:
            raise UserError(
                f"--preprocessor={config.preprocessor} does not take a batch of strings."
            )
        if not signature.takes_dict:
            raise UserError(
                f"--preprocessor is for encoders that take token ids; --backbone="
                f"{config.backbone} takes {signature.input.dtype.name} inputs: drop --preprocessor."
            )
    elif signature.takes_dict:
        raise UserError(
            f"--backbone={config.backbone} is an encoder taking {sorted(signature.input)}; pass "
            "its text preprocessing module with --preprocessor=<handle>."
        )
    elif not (signature.takes_text or signature.takes_images):
        raise UserError(
            f"--backbone={config.backbone} takes {signature.input}; tf-finetune needs an image "
            "module (float32 [batch, h, w, 3]) or a text module (tf.string [batch])."
        )
    if not signature.takes_images:
        if config.image_size:
            raise UserError("--image_size does not apply to a text backbone; drop it.")
        return dataclasses.replace(config, image_size=0)
    fixed = signature.image_size
    if config.image_size and fixed and config.image_size != fixed:
        raise UserError(
            f"--image_size={config.image_size}, but the hub module takes {fixed}x{fixed} "
            f"images; use --image_size={fixed} (or leave it unset)."
        )
    return dataclasses.replace(config, image_size=config.image_size or fixed or DEFAULT_IMAGE_SIZE)


def is_text_model(config) -> bool:
    """Whether a resolved config describes a hub text classifier (strings in)."""
    return is_hub_backbone(config.backbone, config.model_dir) and config.image_size == 0


# ----------------------------------------------------------------------------- model
def build_classifier(config, num_classes: int) -> keras.Model:
    """The hub classifier for a resolved config; call inside `strategy.scope()`.

    Image models take float32 0-255 pixels [batch, size, size, 3] (like Keras Applications
    models here, so the export and evaluation are shared); text models take tf.string [batch].
    Returns softmax probabilities (float32).
    """
    trainable = config.unfreeze == "all"
    # The modules are loaded here, inside the caller's strategy scope, so their variables are
    # mirrored (HubLayer refuses a module loaded outside the scope).
    if config.image_size:
        inputs = keras.Input((config.image_size, config.image_size, 3), name="pixels")
        x = keras.layers.Rescaling(1.0 / 255, name="preprocessing")(inputs)
    else:
        inputs = keras.Input((), dtype="string", name="text")
        x = inputs
        if config.preprocessor:
            x = hub.HubLayer(config.preprocessor, output_key=hub.ALL_OUTPUTS, name="preprocessor")(
                x
            )
    backbone = hub.HubLayer(config.backbone, trainable=trainable, name="backbone")
    if hub.module_kind(config.backbone) == "classification":
        logging.info(
            "%s is a classification module: the new head goes on top of its logits.",
            config.backbone,
        )
    x = backbone(x)
    outputs = head.add_head(
        x,
        num_classes,
        config.dropout,
        f"--backbone={config.backbone}",
        config.task == "multi_label",
    )
    return keras.Model(inputs, outputs, name="hub_classifier")


def get_backbone(model: keras.Model) -> hub.HubLayer:
    """The HubLayer holding the backbone module in a model from `build_classifier`."""
    return model.get_layer("backbone")
