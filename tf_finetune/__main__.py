"""`python -m tf_finetune train ...` is the same as `tf-finetune train ...`."""

from tf_finetune.cli import run

if __name__ == "__main__":
    run()
