"""The options of each stage, declared once (pipeline/options.py): the stages take them, the CLI is
built from them. torch is not imported here, so `arra-pipe --help` stays fast."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE
from pipeline.lm.objective import Objective
from pipeline.options import check, option
from pipeline.data.sources import FORMATS, SourceOptions


@dataclass(frozen=True, kw_only=True)
class TrainOptions(Objective):
    """Everything a run is made of: the ARRA objective's settings (inherited) and the rest. Each
    field's default and flag are declared here once; `arra-pipe train` is built from them."""

    sets: list[str]
    run: str
    teacher: str | None = option(None, "Teacher column to align to (default: the sets' only teacher).")
    model: str = option("tiny", "Preset (tiny, llamagen-b|l|xl|xxl|3b) for ARRA-Base, or hf:PATH for a text-only causal LM (ARRA).")
    init: str | None = option(None, "ARRA-Adapt: continue from a directory written by `arra-pipe export`.", exists="dir")
    condition: str = option("class", "Presets: condition on the class label, on the caption's tokens, or on the sets' "
                                     "cached caption-encoder features (extract --caption-encoder; LlamaGen's FLAN-T5 "
                                     "text-to-image condition).", choices=("class", "text", "caption-features"))
    text_tokenizer: str | None = option(None, "--condition text: a tokenizer directory, or `train` to fit a small BPE on the captions (default).")
    text_vocab: int = option(2048, "Vocabulary of the BPE trained with --text-tokenizer train.", min=2)
    max_text_len: int = option(64, "Caption tokens kept (truncation).", min=1)
    cond_dropout: float = option(0.1, "Probability of dropping the condition (for classifier-free guidance).", min=0, max=1)
    dropout: float = option(0.0, "Attention dropout of preset models.", min=0, max=1, max_open=True)
    residual_dropout: float = option(0.0, "Dropout on each decoder layer's attention and MLP outputs before the "
                                          "residual add, for any LM (LlamaGen 0.1, the official 7B 0.05).",
                                     min=0, max=1, max_open=True)
    token_dropout: float = option(0.0, "Dropout on the input token embeddings, for any LM (LlamaGen 0.1).",
                                  min=0, max=1, max_open=True)
    zero_init_head: bool = option(False, "Presets: start the output head at zero, as LlamaGen does (default: "
                                         "transformers' normal init).")
    image_head: str | None = option(None, "Output-head rows of the image tokens of a pretrained LM (--model hf: or "
                                          "--init): zero, as the official code's starting point does (inherited "
                                          "from Lumina-mGPT's Chameleon start, and applied even to Lumina-mGPT's own "
                                          "trained head), or keep [default: zero for a Chameleon-family --model hf:, "
                                          "the official ARRA start; keep for --init, where the head already draws "
                                          "images (ARRA-Adapt) and zeroing would erase it, and for a text-only LM, "
                                          "whose new rows start at the mean of the old ones]. Recorded in the run.",
                                    choices=("keep", "zero"))
    rope: str = option("1d", "Rotary positions of image codes: 1d along the sequence (transformers' Llama), or 2d "
                             "by grid row and column as LlamaGen (Llama LMs; recorded with the model, so sampling "
                             "and --init use the same).", choices=("1d", "2d"))
    zero: int = option(0, "DeepSpeed ZeRO stage.", min=0, max=3)
    offload: str = option("none", "Offload optimizer (and ZeRO-3 params) to CPU.", choices=("none", "cpu"))
    device: str = option("cpu", "Where the ranks train.", choices=("cpu", "cuda"))
    micro_batch: int = option(8, "Sequences per rank per micro-step.", min=1)
    grad_accum: int = option(1, "Micro-steps per optimizer step.", min=1)
    steps: int | None = option(None, "Optimizer steps (default: --epochs).", min=1)
    epochs: float | None = option(None, "Epochs over the sets (default 1 when --steps is not given).", min=0, min_open=True)
    lr: float = option(1e-4, "Peak learning rate.", min=0)
    min_lr: float = option(0.0, "Floor of the cosine schedule.", min=0)
    warmup_steps: int = option(0, "Linear warm-up steps.", min=0)
    schedule: str = option("constant", "Learning-rate schedule after the warm-up.", choices=("constant", "cosine"))
    weight_decay: float = option(0.05, "AdamW weight decay of the matrices (not norms or biases).", min=0)
    decay_all: bool = option(False, "Apply --weight-decay to every parameter, norms and biases too, as the official "
                                    "ARRA/Lumina-mGPT optimizer does (default: matrices only, LlamaGen's choice).")
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = option(1.0, "Gradient clipping (global norm).", min=0)
    seed: int = option(0, "Seed of the model init, the data order and condition dropout.", min=0)
    save_every: int = option(1000, "Checkpoint every N steps (and at the end).", min=1)
    keep_checkpoints: int = option(2, "Checkpoints kept (older ones are deleted); 0 keeps all.", min=0)
    shuffle_buffer: int = 8192
    exclude: str | None = option(None, "File of keys (one per line) to leave out, e.g. from `arra-pipe audit`.",
                                 name="--exclude-keys", exists="file")
    deepspeed_config: str | None = option(None, "Use this DeepSpeed JSON config instead of the generated one.", exists="file")
    activation_checkpointing: bool = option(False, "Recompute each decoder layer in the backward pass instead of keeping "
                                                   "its activations (less memory, about a third more compute).")
    progress: bool = option(True, "Show a progress bar.", negatable=True)


@dataclass(frozen=True)
class AuditOptions:
    """What every audit takes. The cosine threshold at or above which two rows count as the same
    image is a starting point to check on each dataset, not a law. Measured with EfficientNet-Lite0:
    exact copies score 1 and +-6 brightness copies above 0.998, while distinct look-alikes of a
    low-variety domain come close (Fashion-MNIST at 112 px: test items reach 0.943 against train, and
    two different shirts 0.96). Read the cosines in the reports and the memorization histogram, and
    raise it (0.98) for such domains."""

    teacher: str | None = option(None, "Teacher column to compare (default: the set's only teacher).")
    threshold: float = option(0.95, "Cosine at or above which two images count as the same (exact and lightly "
                              "edited copies score above 0.99; check the reported cosines on your data).", min=-1, max=1)
    index: str = option("auto", "auto: exact up to 50,000 rows, HNSW above; approximate indexes report their "
                        "measured recall.", choices=("auto", "exact", "ivf", "hnsw"))
    recall_target: float = option(0.95, "IVF/HNSW: widen the search until recall@1 vs exact reaches this on a "
                                  "sample, but not past comparing each query with 1/32 of the set (wider costs about "
                                  "as much as exact search); the report warns if the target was not reached.", min=0, max=1)
    seed: int = option(0, "Seed of the recall samples and IVF training sample.", min=0)
    k: int = 10  # neighbours looked at per row (dedup, leakage); each command declares its own --k

    def __post_init__(self):
        check(self)


@dataclass
class ExtractOptions:
    """What a feature set is made of. Each flag's default is declared here once; `arra-pipe extract`
    (and `tokenizer fit`, for the source flags) are built from them."""

    source: str | None  # None: adding teachers to the set at `out`, whose manifest names its source
    out: str
    source_format: str | None = option(None, "Override auto-detection of the source format.", choices=FORMATS)
    source_options: SourceOptions = field(default_factory=SourceOptions)
    tokenizer: str = option("kmeans", "Tokenizer name (see `arra-pipe models`) or a .toml manifest.")
    tokenizer_path: str | None = option(None, "Tokenizer weights file or folder (kmeans: the codebook from `tokenizer fit`).",
                                        exists="any")
    tokenizer_resolution: int | None = option(None, "Canonical crop size for a convolutional VQ tokenizer (LlamaGen: 256, "
                                                    "384 or 512).", min=16)
    teachers: tuple[str, ...] = option(("efficientnet-lite0",), "Teacher name or .toml manifest; repeat for several "
                                       "teachers in one pass.", name="--teacher", multiple=True)
    teacher_paths: dict[str, str] = field(default_factory=dict)  # --teacher-path [NAME=]PATH
    teacher_aggregations: dict[str, str] = field(default_factory=dict)  # --aggregation [NAME=]AGG
    caption_encoder: str | None = option(None, "Also store each caption's per-token features from this caption encoder "
                                               "(flan-t5-xl: LlamaGen's text-to-image condition, 120 tokens x 2048) as the "
                                               "column caption.NAME, for `train --condition caption-features`.")
    caption_encoder_path: str | None = option(None, "Caption encoder checkpoint folder (config.json, safetensors, "
                                                    "tokenizer.json), when not where the registry finds it.", exists="dir")
    jpeg_draft: bool = option(False, "Decode JPEGs reduced (1/2, 1/4, 1/8) to the size the crops need: faster on large "
                                     "photos, codes and features change a little (recorded).")
    keep_images: bool = option(False, "Also keep the canonical crops (PNG, columns/image/) so teachers can be added later "
                                      "without the source.")
    teacher_resolution: int | None = option(None, "Feed teachers this input size instead of their native one (recorded "
                                                  "in the manifest).", min=16)
    teacher_view: str = option("crop", "crop: teachers see the tokenizer's canonical crop; original: the whole original "
                                       "image through the teacher's own resize+crop, as the official code.",
                               choices=("crop", "original"))
    batch_size: int = option(64, "Rows per Arrow record batch. Keep it fixed when resuming.", min=1)
    model_batch: int | None = option(None, "Images per model forward, at most --batch-size [default: 64 on cpu, "
                                           "--batch-size on cuda]; recorded, and without this flag a re-run or resume keeps "
                                           "the recorded one (it may change features' last bits).", min=1)
    device: str = option("cpu", "Where the models run (bf16 autocast on cuda).", choices=("cpu", "cuda"))
    shard_size: int = option(4096, "Input records per shard.", min=1)
    max_reject_rate: float = option(0.1, "Fail the run when more than this fraction of records is rejected.", min=0, max=1)
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "Reject images with more pixels than this (decompression bombs).", min=1)
    max_side: int = option(DEFAULT_MAX_SIDE, "Reject images with a side longer than this, from the header, before "
                                             "decoding.", min=1)
    workers: int | None = option(None, "DataLoader worker processes that decode and crop images; extract gives the "
                                       "models' torch threads the rank's other CPUs; with 0 the models' process decodes, on a "
                                       "thread, one batch ahead of the models [default: extract a quarter of this "
                                       "rank's share of the CPUs it may use, other commands all but one].", min=0)
    progress: bool = option(True, "Show a progress bar.", negatable=True)

    def __post_init__(self):
        check(self)

    def teacher(self, name: str):
        """The teacher `name` as these options build it (weights, input size, aggregation)."""
        from pipeline.models.registry import build
        return build("teachers", name, self.teacher_paths.get(name), input_size=self.teacher_resolution,
                     aggregation=self.teacher_aggregations.get(name))

    def new_teachers(self, manifest: dict) -> list[str]:
        """The --teacher names a finished set (its manifest) does not hold yet."""
        from pipeline.models.registry import load_spec
        return [n for n in self.teachers if load_spec("teachers", n)["name"] not in manifest["teachers"]]
