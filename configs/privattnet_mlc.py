"""PrivAttNet_MLC (our reading): the attention trunk with a 67-attribute multi-label head.

Trained with sigmoid BCE on the non-safe attributes; the privacy score is derived
from the predicted attribute probabilities and the preferences with the ground
truth's pooling (attributes.pooled_soft_score).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = "privattnet_mlc"
  return config
