"""PR-CNN (Orekondy et al. 2017): CNN -> 68 -> 128 sigmoid -> 128 sigmoid -> 30 profile scores.

VISPR's `googlenet-prcnn` used GoogLeNet at 227 px (pool5, dropout 0.4); ours is the ResNet-50
encoder through conv5_x at `image_size` (224), global average pooled, trained end to end. The
68-way layer is linear and has no loss of its own, as there.

Targets: the 30 per-profile scores (`score.per_profile`), normalised per column as every
regression row: the loss sees (y - mean_train) * 2. Loss: our masked MSE, not Caffe's
EuclideanLoss literally. Caffe's is sum_n ||yhat_n - y_n||^2 / (2N) on raw scores (VISPR weights
it by 0.03); ours, the mean over examples and profiles of the squared error in normalised units,
is 4 / P * sum_n ||yhat_n - y_n||^2 / N = 8 / P times Caffe's unweighted loss (0.27 at P = 30).
Same minimiser, and Adam is invariant to a constant scale of the loss (up to its epsilon), so
the rows of the table differ in architecture only, not in loss conventions.

eval_<split>.json: the headline keys and `per_profile` are the 30 profiles' metrics (averaged
and one by one; checkpoints are selected on the averaged Spearman). `table` is the paper's row:
the mean of the 30 predictions against the profile-mean ground truth of the other rows
(`scoring.table_scores`).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = "pr_cnn"
  config.model.encoder.stages = 4
  config.model.encoder.trainable = True
  config.score.per_profile = True
  return config
