"""Test Spearman of head training from K cached augmented views per image, against the image path.

  python -m benchmarks.augmentation_views_benchmark                      # K = 0, 1, 4, 8 and images
  python -m benchmarks.augmentation_views_benchmark --views=0,8 --epochs=4 --num_train=500

The paper draws a new random resized crop and flip of every training image each epoch. The fast
recipe (`feature_cache`) encodes the frozen encoder's features once; with `train_views=K` it
caches K augmented views per image and draws one per step, with K=0 one unaugmented view. This
trains the same model (the demo's PrivAttNet head on a frozen, randomly initialised tiny encoder
with frozen BatchNorm: the demo's encoder cannot be cached, it is trained) on the same synthetic
data and seed both ways, and prints the best-validation checkpoint's test metrics per recipe and
the wall time of each run (cache build included). One seed per recipe: differences of a few
hundredths are within run-to-run noise.
"""

import pathlib
import time

from absl import app
from absl import flags

from configs import demo
from privattnet_jax.training import train

flags.DEFINE_list("views", ["0", "1", "4", "8"], "Cached views per training image to measure.")
flags.DEFINE_bool(
  "images", True, "Also train on the images with full augmentation (the paper's recipe)."
)
flags.DEFINE_integer("epochs", 10, "Training epochs.")
flags.DEFINE_integer("num_train", 1000, "Synthetic training images.")
flags.DEFINE_integer("num_val", 300, "Synthetic validation images.")
flags.DEFINE_integer("num_test", 500, "Synthetic test images.")
flags.DEFINE_integer("seed", 12345, "Model, shuffling and augmentation seed.")
flags.DEFINE_string("workdir", "/tmp/augmentation_views", "Data, feature caches and runs go here.")
FLAGS = flags.FLAGS


def make_config(views: int | None):
  """The demo, with a frozen encoder; `views` None: the image path, else the cache with K views."""
  config = demo.get_config()
  root = pathlib.Path(FLAGS.workdir)
  config.seed = FLAGS.seed
  config.num_epochs = FLAGS.epochs
  config.eval_splits = ("test",)
  config.data.data_dir = str(root / "data")
  config.data.synthetic.num_train = FLAGS.num_train
  config.data.synthetic.num_val = FLAGS.num_val
  config.data.synthetic.num_test = FLAGS.num_test
  config.model.encoder.trainable = False
  config.model.encoder.batchnorm = "frozen"
  if views is not None:
    config.feature_cache.mode = "host"
    config.feature_cache.train_views = views
    config.feature_cache.dir = str(root / f"feature_cache_k{views}")
  return config


def main(argv):
  del argv
  recipes = [(f"cache, K={int(k)}", int(k)) for k in FLAGS.views]
  if FLAGS.images:
    recipes.append(("images, full augmentation", None))
  rows = []
  for name, views in recipes:
    start = time.time()
    name_dir = "images" if views is None else f"k{views}"
    results = train.train_and_evaluate(
      make_config(views), str(pathlib.Path(FLAGS.workdir) / "runs" / name_dir)
    )
    test = results["test"]
    rows.append(
      f"| {name} | {test['spearman']:.3f} | {test['pearson']:.3f} | {test['l1']:.3f} | "
      f"{time.time() - start:.0f} |"
    )
    print(rows[-1], flush=True)
  print(
    f"\n{FLAGS.epochs} epochs, {FLAGS.num_train} / {FLAGS.num_val} / {FLAGS.num_test} images, seed {FLAGS.seed}"
  )
  print("| recipe | test Spearman | Pearson | L1 | wall s |\n|---|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
