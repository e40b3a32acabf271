"""The feature pass against the machine's limit (issue 14 item 3), on the same files in one run.

    python scripts/feature_pass.py --folder=/work/shared/data/flowers_128
    python scripts/feature_pass.py --phone=/tmp/phone300   # makes the photos once, then reuses

Prints three rates in images/s, each measured alone: `decode` (data.decode_and_resize through
tf.data, what every path decodes with), `forward` (MobileNetV2-0.35 at 128 on an in-memory
batch, tf.function) and `pass` (features.extract over data.feature_pipeline: what a run does),
with limit = 1 / (1/decode + 1/forward) and pass / limit. `measure()` returns them as a dict for
a benchmark. The backbone is built without downloading (random weights: same speed).
"""

import argparse
import os
import tempfile
import time

SHARED_FLOWERS = "/work/shared/data/flowers_128"
PHONE_SIZE = (3000, 2000)


def make_phone_photos(dst: str, src: str = SHARED_FLOWERS, n: int = 300) -> str:
    """`n` phone-size photos: flowers upscaled bicubic to 3000x2000, JPEG quality 90, in class
    folders under `dst`; reused when already there."""
    from PIL import Image

    done = os.path.join(dst, ".complete")
    if os.path.exists(done):
        return dst
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    per_class = -(-n // len(classes))
    made = 0
    for name in classes:
        os.makedirs(os.path.join(dst, name), exist_ok=True)
        for file in sorted(os.listdir(os.path.join(src, name)))[:per_class]:
            if made == n:
                break
            out = os.path.join(dst, name, file)
            if not os.path.exists(out):
                with Image.open(os.path.join(src, name, file)) as im:
                    big = im.convert("RGB").resize(PHONE_SIZE, Image.BICUBIC)
                big.save(out + ".tmp", "JPEG", quality=90)
                os.replace(out + ".tmp", out)
            made += 1
    open(done, "w").close()
    return dst


def _extractor(folder: str, image_size: int, num_classes: int):
    """Our classifier's feature extractor: MobileNetV2-0.35, random weights (same speed)."""
    from tf_finetune import features
    from tf_finetune import model as model_lib
    from tf_finetune.config import Config
    from tf_finetune.resolve import resolve

    config = resolve(
        Config(
            data=folder,
            backbone="mobilenet_v2",
            backbone_alpha=0.35,
            weights="none",
            image_size=image_size,
            unfreeze="0",
            model_dir=tempfile.mkdtemp(prefix="feature_pass_"),
        )
    )
    return features.split_classifier(model_lib.build_model(config, num_classes))[0]


def _split(folder: str, image_size: int):
    from tf_finetune import data

    try:  # every file in one split; no decoding here (the pass decodes)
        dataset = data.load_image_folder(folder, image_size, 1, decode_check=())
    except TypeError:  # before decode_check: decodes every file once here (not timed)
        dataset = data.load_image_folder(folder, image_size, 1)
    return dataset.train, dataset.num_classes


def _timed(run, images: int) -> float:
    start = time.perf_counter()
    run()
    return images / (time.perf_counter() - start)


def measure(folder: str, image_size: int = 128, rounds: int = 3) -> dict:
    """decode, forward and pass rates (images/s, best of `rounds` interleaved rounds, each
    after one untimed warm-up that traces and fills the page cache), the limit and pass/limit."""
    import tensorflow as tf

    from tf_finetune import data, features

    split, num_classes = _split(folder, image_size)
    n = split.count
    extractor = _extractor(folder, image_size, num_classes)
    batch = getattr(features, "INFERENCE_BATCH", 32)
    parallel = getattr(data, "FEATURE_PARALLEL_CALLS", tf.data.AUTOTUNE)
    paths = split.source.map(lambda k, _: k)

    def decode():
        ds = paths.map(lambda p: data.decode_and_resize(tf.io.read_file(p), image_size), parallel)
        for _ in ds.batch(batch).prefetch(2):
            pass

    forward = tf.function(lambda x: extractor(x, training=False))
    pixels = tf.random.uniform([batch, image_size, image_size, 3], 0, 255)

    def forward_only():
        for _ in range(-(-n // batch)):
            forward(pixels).numpy()

    def feature_pass():
        if hasattr(data, "feature_pipeline"):
            pipeline = data.feature_pipeline(split, num_classes, batch)
        else:  # what extract_splits did before: the training pipeline at the training batch
            pipeline = data.make_pipeline(split, num_classes, 32, False, 0)
        features.extract(extractor, pipeline, n, verbose=0)

    runs = {"decode": decode, "forward": forward_only, "pass": feature_pass}
    for run in runs.values():
        run()
    rates = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            rates[name].append(_timed(run, n))
    best = {name: max(r) for name, r in rates.items()}
    limit = 1 / (1 / best["decode"] + 1 / best["forward"])
    return {"images": n, "batch": batch, **best, "limit": limit, "of_limit": best["pass"] / limit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", help="an image folder (class subfolders)")
    parser.add_argument("--phone", help="make (once) and measure 300 phone-size photos here")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = make_phone_photos(args.phone) if args.phone else args.folder
    r = measure(folder, args.image_size, args.rounds)
    print(
        f"{folder}: {r['images']} images at {args.image_size} px, batch {r['batch']}: "
        f"decode {r['decode']:.0f}/s, forward {r['forward']:.0f}/s, pass {r['pass']:.0f}/s; "
        f"limit {r['limit']:.0f}/s, pass = {100 * r['of_limit']:.0f}% of it "
        f"(load {os.getloadavg()[0]:.2f})"
    )


if __name__ == "__main__":
    main()
