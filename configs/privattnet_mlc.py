"""PrivAttNet_MLC (our reading): the attention trunk with a 67-attribute multi-label head.

Trained with sigmoid BCE on the non-safe attributes; the privacy score is the ground truth's
expectation under the predicted attribute probabilities (attributes.pooled_soft_score,
`score.attribute_rule`). The per-step head's output bias starts at the training labels' log
prior odds (`model.attribute_bias_init`): from PyTorch's init it barely learns
(docs/benchmarks.md, "PrivAttNet_MLC").
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = "privattnet_mlc"
  return config
