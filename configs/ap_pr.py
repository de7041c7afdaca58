"""AP-PR (Orekondy et al. 2017): an attribute predictor, then the risk from its predictions.

ResNet-50 through conv5_x, global average pooling, a 68-way linear layer (`a0_safe`
included), sigmoid BCE on the attribute labels, trained end to end; VISPR's attribute
predictor was also a fine-tuned ResNet-50. The risk is never trained on: at evaluation each
image's score is the expected ground truth under its predicted attribute probabilities p and
the table `config.score` selects (`attributes.pooled_soft_score`, `score.attribute_rule`: under
max pooling, the preference of the most sensitive attribute present, averaged over which
attributes are present, each independently with its p; `product`, max_a p_a * pref_a, was the
rule before). That is our reading, not VISPR's text; it is the ground truth itself when the
probabilities are 0 or 1, and `a0_safe` (preference 0) never adds risk. The output bias starts
at the training labels' log prior odds (`model.attribute_bias_init`). Training ignores the preferences, so one checkpoint serves every table:
with `score.per_profile=True` the same probabilities give all 30 profile scores.

eval_<split>.json adds `attribute_map` (macro average precision over the attributes with a
positive example in the split) and `attribute_ap` ({attribute_id: AP}, null without one).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = "ap_pr"
  config.model.encoder.stages = 4
  config.model.encoder.trainable = True
  return config
